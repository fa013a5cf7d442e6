// Recovery: how much of the tuned model's margin gap a patch brings back (mean gain / mean gap), with a
// bootstrap CI; undefined (NaN, null in JSON) when the gap itself is at rounding level.
import { bootstrapRatioCI, mean, seededRandom } from "../stats/stats.js";
import type { Combo } from "./scoring.js";
import type { RunSettings } from "./settings.js";
import type { ControlSummary, GainSummary, PatchingEntry } from "./schema.js";

/** Whether the mean gap is too small, against the margins' own scale, for a recovery ratio to mean anything. */
export function gapTooSmall(marginBase: ArrayLike<number>, marginTuned: ArrayLike<number>): boolean {
  const gap = Array.from(marginTuned, (t, i) => t - marginBase[i]!);
  const scale = mean(Array.from(marginBase, Math.abs)) + mean(Array.from(marginTuned, Math.abs));
  return !(Math.abs(mean(gap)) > 1e-6 * scale);
}

/** Recovery of per-pair gains against per-pair gaps, with a bootstrap CI of `reps` resamples. */
export function summarizeGains(
  gains: ArrayLike<number>,
  gap: ArrayLike<number>,
  noGap: boolean,
  reps: number,
  seed: number,
): GainSummary {
  return {
    gains: Array.from(gains),
    recovery: noGap ? NaN : mean(gains) / mean(gap),
    recovery_ci: noGap ? [NaN, NaN] : bootstrapRatioCI(gains, gap, reps, seededRandom(seed)),
  };
}

/** The patching table: each combo's real gains and, when run, its controls' gains, summarized. */
export function patchingEntries(
  combos: Combo[],
  gains: { real: ArrayLike<number>[]; random: ArrayLike<number>[] | null; meanAblation: ArrayLike<number>[] | null },
  gap: ArrayLike<number>,
  noGap: boolean,
  s: RunSettings,
  method: "exact" | "attribution" = "exact",
): PatchingEntry[] {
  const summarize = (g: ArrayLike<number>) => summarizeGains(g, gap, noGap, s.bootstrap, s.seed + 1);
  const control = (real: ArrayLike<number>, g: ArrayLike<number>): ControlSummary => ({
    ...summarize(g),
    real_minus_control_ci: summarize(Array.from(real, (v, i) => v - g[i]!)).recovery_ci,
  });
  return combos.map((c, ci) => ({
    method,
    window: s.window,
    direction: c.direction,
    site: c.site,
    layer: c.layer,
    alpha: s.alpha,
    ...summarize(gains.real[ci]!),
    controls:
      gains.random && gains.meanAblation
        ? {
            random_direction: control(gains.real[ci]!, gains.random[ci]!),
            mean_ablation: control(gains.real[ci]!, gains.meanAblation[ci]!),
          }
        : null,
  }));
}
