// Recovery: how much of the tuned model's margin gap a patch brings back (mean gain / mean gap), with a
// bootstrap CI; undefined (NaN, null in JSON) when the gap itself is at rounding level.
import { bootstrapRatioCI, mean, seededRandom } from "../stats/stats.js";
import type { Combo } from "./scoring.js";
import type { RunSettings } from "./settings.js";
import type { ControlSummary, GainSummary, PairRecord, PatchingEntry } from "./schema.js";

/** A bound on the float32 rounding of one model's margin of a pair (its two response log-probabilities' sums). */
export const marginNoise = (p: Pick<PairRecord, "logp">, m: "base" | "tuned"): number =>
  8 * 2 ** -23 * (Math.abs(p.logp[m].chosen) + Math.abs(p.logp[m].rejected));

/**
 * A bound on the float32 rounding of a pair's gap: each model's two response log-probabilities are float32 sums,
 * so their margins are known to about 8·2⁻²³ of the log-probabilities' size (the bound tune's noise floor uses).
 */
export const gapNoise = (p: Pick<PairRecord, "logp">): number =>
  8 *
  2 ** -23 *
  (Math.abs(p.logp.base.chosen) +
    Math.abs(p.logp.base.rejected) +
    Math.abs(p.logp.tuned.chosen) +
    Math.abs(p.logp.tuned.rejected));

/**
 * Whether the mean gap is too small for a recovery ratio to mean anything: within the pairs' mean float32
 * rounding bound (`noise`, gapNoise per pair; identical responses give a gap of rounding alone), or below 1e-6 of
 * the margins' own scale.
 */
export function gapTooSmall(
  marginBase: ArrayLike<number>,
  marginTuned: ArrayLike<number>,
  noise: ArrayLike<number> = [],
): boolean {
  const gap = Array.from(marginTuned, (t, i) => t - marginBase[i]!);
  const scale = mean(Array.from(marginBase, Math.abs)) + mean(Array.from(marginTuned, Math.abs));
  const floor = noise.length ? mean(noise) : 0;
  return !(Math.abs(mean(gap)) > Math.max(1e-6 * scale, floor));
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
