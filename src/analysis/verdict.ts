// The verdict: the four questions a reader asks of a run, each answered yes, no or "cannot tell" by a stated
// test against its null, with the evidence in the same line. Pure: a Results in, sentences out.
import { bootstrapMeanCI, signTest } from "../stats/tests.js";
import { bootstrapRatioCI, mean, seededRandom } from "../stats/stats.js";
import { gapNoise, gapTooSmall } from "./recovery.js";
import { num, pct, pValue } from "./words.js";
import type { LassoPermutation } from "../stats/lasso.js";
import type { PairRecord, PatchingEntry, Results } from "./schema.js";

/** Resamples of the verdict's own bootstrap intervals (fixed, so the verdict is a function of the results). */
const REPS = 2000;

/**
 * The fewest pairs a bootstrap interval may decide anything on: over fewer, resampling sees too few distinct
 * sets (one pair gives a zero-width interval), so every answer resting on one is "cannot tell with n pairs".
 */
export const MIN_PAIRS = 10;

/**
 * The least share of the gap a single component must carry, at its CI's lower bound, to count as a place where
 * the change enters: with many pairs every non-zero effect is significant, and "above 0" alone would call a
 * 2% contribution a location.
 */
export const MIN_SHARE = 0.1;

/** How the tuned model compares with the base on these pairs. */
export type Better = "yes" | "no" | "cannot tell" | "no gap";

/** Is the tuned model better on these pairs? Mean gap against 0 (bootstrap CI) and against rounding, with the sign test. */
export function betterVerdict(pairs: PairRecord[]): { answer: Better; line: string } {
  const gaps = pairs.map((p) => p.gap);
  const n = gaps.length;
  const g = mean(gaps);
  const noise = pairs.map(gapNoise);
  const q = "Verdict — is the tuned model better on these pairs?";
  // the rule that makes every recovery ratio undefined: the same "no gap" everywhere
  const margin = (m: "base" | "tuned") => pairs.map((p) => p.margin[m]);
  if (gapTooSmall(margin("base"), margin("tuned"), noise))
    return {
      answer: "no gap",
      line: `${q} No gap: the two models' margins differ by no more than float32 rounding (mean gap ${num(g)}, rounding bound ${num(mean(noise))}), so nothing below measures a preference.`,
    };
  const [lo, hi] = bootstrapMeanCI(gaps, REPS, seededRandom(0));
  const up = gaps.filter((x) => x > 0).length;
  const moved = gaps.filter((x) => x !== 0).length;
  const sign = `higher on ${up} of ${n} pairs, sign test p = ${pValue(signTest(up, moved))}`;
  const ci = `mean gap ${num(g)}, 95% bootstrap CI ${num(lo)} to ${num(hi)}`;
  // both the interval and the sign test must say so, and on enough pairs for the interval to mean anything
  const decided = n >= MIN_PAIRS && signTest(up, moved) < 0.05;
  if (!decided || (lo <= 0 && hi >= 0))
    return {
      answer: "cannot tell",
      line: `${q} Cannot tell with ${n} pairs: ${n < MIN_PAIRS ? `fewer than ${MIN_PAIRS} pairs decide nothing here (${ci}; ${sign})` : lo <= 0 && hi >= 0 ? `the ${ci} includes 0 (${sign})` : `the sign test does not reject (${ci}; ${sign})`}.`,
    };
  if (lo > 0) return { answer: "yes", line: `${q} Yes: the tuned model's margin is higher (${ci}; ${sign}).` };
  if (hi < 0)
    return {
      answer: "no",
      line: `${q} No: the tuned model's margin is lower (${ci}; ${sign}). It does not prefer the chosen responses more than the base here, so a "recovery" below is how much of a loss a patch brings back, not where a preference lives.`,
    };
  return { answer: "cannot tell", line: `${q} Cannot tell with ${n} pairs: the ${ci} includes 0 (${sign}).` };
}

/**
 * Recovery CI at `level` from per-pair gains and the pairs' gaps (the verdict's own resamples: at least 20 in
 * each tail, so a Bonferroni level over many patches still has its quantile resolved).
 */
export const ciAt = (gains: number[], gaps: number[], level: number): [number, number] =>
  bootstrapRatioCI(gains, gaps, Math.max(REPS, Math.ceil(40 / (1 - level))), seededRandom(1), level);

/**
 * Where does the change enter? Only per-component patches (attn_out, mlp_out; tuned→base) can say: a layer
 * counts when its recovery's CI, Bonferroni-corrected over the m component patches looked at, is above MIN_SHARE
 * and the corrected CI of (real − random direction) is above 0. resid_post recovery rises with depth by
 * construction.
 */
export function whereVerdict(r: Results): string {
  const q = "Verdict — where does the change enter?";
  const parts = r.patching.filter(
    (e) =>
      e.direction === "tuned->base" && (e.site === "attn_out" || e.site === "mlp_out") && Number.isFinite(e.recovery),
  );
  if (!parts.length)
    return `${q} Cannot tell: only residual-stream sites were patched, and a resid_post patch carries every change made below it, so its recovery rises with depth by construction; patch attn_out and mlp_out to see where the change enters.`;
  const gaps = r.pairs.map((p) => p.gap);
  const m = parts.length;
  const level = 1 - 0.05 / m;
  if (gaps.length < MIN_PAIRS)
    return `${q} Cannot tell with ${gaps.length} pairs: fewer than ${MIN_PAIRS} decide nothing here.`;
  const hits = parts.filter((e) => {
    const [lo] = ciAt(e.gains, gaps, level);
    const rnd = e.controls?.random_direction;
    const beats =
      !rnd ||
      ciAt(
        e.gains.map((v, i) => v - rnd.gains[i]!),
        gaps,
        level,
      )[0]! > 0;
    return lo >= MIN_SHARE && beats;
  });
  const corr = `${pct(level)} CIs, Bonferroni over the ${m} component patches`;
  const share = `at least ${pct(MIN_SHARE)} of the gap and more than a random direction`;
  if (!hits.length) return `${q} Not supported: no single attn_out or mlp_out patch recovers ${share} (${corr}).`;
  const best = hits.reduce((a, b) => (b.recovery > a.recovery ? b : a));
  const list = (xs: PatchingEntry[]) => xs.map((e) => `${e.site} ${e.layer}`).join(", ");
  const each = `each alone recovers ${share} (${corr}); the largest is ${best.site} at layer ${best.layer}, ${pct(best.recovery)}`;
  if (hits.length > m / 2) return `${q} Not localized: ${hits.length} of ${m} component patches ${each}.`;
  return `${q} At ${list(hits)} (${hits.length} of ${m} component patches): ${each}.`;
}

/** The permutation test's evidence in words: the real and shuffled CV errors and p. */
export const permutationWords = (p: LassoPermutation): string =>
  `CV MSE ${num(p.cv_mse)} vs a median ${num(p.null_median_mse)} over ${p.reps} shuffles, permutation p = ${pValue(p.p_value)}`;

/** Is the effect sparse over layers? LASSO's selection, its bootstrap stability and its stability over CV seeds. */
export function sparseVerdict(r: Results): string | null {
  const l = r.lasso;
  if (!l) return null;
  const q = "Verdict — is it sparse over layers?";
  const nz = l.nonzero_layers;
  const perm = l.permutation;
  if (nz.length && perm && !(perm.p_value < 0.05))
    return `${q} Not supported: LASSO keeps layers ${nz.join(", ")}, but its cross-validated error is no lower than with the gaps shuffled across pairs (${permutationWords(perm)}).`;
  if (!l.stable_across_seeds)
    return `${q} Cannot tell: LASSO's selection changes with the cross-validation seed alone.`;
  if (!nz.length)
    return `${q} No layer's activation distance predicts the per-pair gap better than its mean (LASSO keeps none).`;
  const stable = l.stability.map((v, i) => [i, v] as const).filter(([, v]) => v >= 0.8);
  if (nz.length > r.num_layers / 2)
    return `${q} No: LASSO keeps ${nz.length} of ${r.num_layers} layers (${nz.join(", ")}).`;
  if (l.stability.every((v) => !Number.isFinite(v)))
    return `${q} Cannot tell: LASSO keeps layers ${nz.join(", ")}, but no bootstrap refits were run to check the selection (stability 0).`;
  if (!stable.length)
    return `${q} Cannot tell: LASSO keeps layers ${nz.join(", ")}, but none is selected in ≥ 80% of bootstrap refits.`;
  const beatsShuffled = perm ? `, and it predicts the gaps better than shuffled ones (${permutationWords(perm)})` : "";
  return `${q} Yes: LASSO keeps ${nz.length} of ${r.num_layers} layers (${nz.join(", ")}); ${stable.map(([i]) => i).join(", ")} selected in ≥ 80% of bootstrap refits, the same at every CV seed${beatsShuffled}.`;
}

/** Is it low-rank? The fewest principal directions recovering 90% of the held-out gap, against a random subspace of that size. */
export function lowRankVerdict(r: Results): string | null {
  const p = r.pca;
  if (!p) return null;
  const q = `Verdict — is it low-rank (layer ${p.layer})?`;
  if (p.explained_variance_ratio.every((v) => !(v > 0)))
    return `${q} Cannot tell: the two models' activations at layer ${p.layer} do not differ on the training pairs.`;
  if (!p.recovery.every((x) => Number.isFinite(x.recovery))) return `${q} Cannot tell: there is no gap to recover.`;
  const nTest = p.test_pairs.length;
  const full = p.recovery.find((x) => x.k >= r.hidden_size);
  if (full && full.recovery < 0.9)
    return `${q} Cannot tell: the whole layer's difference recovers only ${pct(full.recovery)} of the held-out gap here, so no subspace of it can reach 90%.`;
  const first = p.recovery.find((x) => x.k < r.hidden_size && x.recovery >= 0.9);
  if (!first)
    return `${q} No: none of the subspace sizes tried below the full width (k = ${tried(r)}) recovers 90% of the held-out gap (${nTest} pairs)${full ? `; the full width (${r.hidden_size}) recovers ${pct(full.recovery)}` : ""}.`;
  if (nTest < MIN_PAIRS)
    return `${q} Cannot tell with ${nTest} held-out pairs: the top ${first.k} directions recover ${pct(first.recovery)}, but fewer than ${MIN_PAIRS} pairs decide nothing here.`;
  const test = subspaceVsRandom(r, first);
  const what = `the top ${first.k} of ${r.hidden_size} directions recover ${pct(first.recovery)} of the held-out gap (${nTest} pairs), a random ${first.k}-dimensional subspace ${pct(first.random_subspace)}`;
  if (test === null)
    return first.recovery > first.random_subspace
      ? `${q} Yes (point estimates only, no per-pair gains in these results): ${what}.`
      : `${q} Cannot tell: ${what}.`;
  return test.beats
    ? `${q} Yes: ${what}; top-k − random recovery ${test.words} is above 0.`
    : `${q} Cannot tell with ${nTest} held-out pairs: ${what}, but top-k − random recovery ${test.words} includes 0.`;
}

/** The subspace sizes the low-rank stage tried below the full width, as "1, 2, 4, …, 32". */
export const tried = (r: Results): string =>
  r
    .pca!.recovery.filter((x) => x.k < r.hidden_size)
    .map((x) => x.k)
    .join(", ");

/**
 * The low-rank test: the CI of (top-k − random k-dim subspace) recovery over the held-out pairs, Bonferroni over
 * the ks tried (the first k reaching 90% is picked among them); null when the results hold no per-pair gains.
 */
export function subspaceVsRandom(
  r: Results,
  at: NonNullable<Results["pca"]>["recovery"][number],
): { beats: boolean; words: string } | null {
  const p = r.pca!;
  if (!at.gains || !at.random_gains || p.test_pairs.length < MIN_PAIRS) return null;
  const gaps = p.test_pairs.map((j) => r.pairs[j]!.gap);
  const m = p.recovery.length;
  const level = 1 - 0.05 / m;
  const [lo, hi] = ciAt(
    at.gains.map((g, i) => g - at.random_gains![i]!),
    gaps,
    level,
  );
  return { beats: lo > 0, words: `${pct(level)} CI ${pct(lo)}–${pct(hi)} (Bonferroni over ${m} values of k)` };
}

/**
 * Steering's test at one strength: the CI of (mean difference − random direction of its norm) recovery over
 * the held-out pairs, Bonferroni over the strengths tried; null without per-pair gains.
 */
export function steeringVsRandom(r: Results, strength: number): { beats: boolean; words: string } | null {
  const p = r.pca!;
  const [md, , rnd] = p.steering;
  const a = md?.by_strength.find((x) => x.strength === strength);
  const b = rnd?.by_strength.find((x) => x.strength === strength);
  if (!a?.gains || !b?.gains || p.test_pairs.length < MIN_PAIRS) return null;
  const gaps = p.test_pairs.map((j) => r.pairs[j]!.gap);
  const m = md!.by_strength.length;
  const level = 1 - 0.05 / m;
  const [lo, hi] = ciAt(
    a.gains.map((g, i) => g - b.gains![i]!),
    gaps,
    level,
  );
  return { beats: lo > 0, words: `${pct(level)} CI ${pct(lo)}–${pct(hi)}, Bonferroni over ${m} strengths` };
}

/**
 * The verdict block: one line per question, most basic first, the later questions only when there is a gap to
 * explain; `better` is the first question's answer ("yes" when there are no pairs to ask it of).
 */
export function verdict(r: Results): { better: Better; lines: string[] } {
  if (!r.pairs.length) return { better: "yes", lines: [] };
  const better = betterVerdict(r.pairs);
  if (better.answer !== "yes") return { better: better.answer, lines: [better.line] };
  const lines = [better.line, whereVerdict(r), sparseVerdict(r), lowRankVerdict(r)];
  return { better: "yes", lines: lines.filter((x): x is string => x !== null) };
}
