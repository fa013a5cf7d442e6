// The tests the findings' claims rest on, each with its null: a binomial tail (chance accuracy, the sign test),
// and a percentile bootstrap of a mean.
import { bootstrapRatioCI } from "./stats.js";

/** log C(n, k). */
function logChoose(n: number, k: number): number {
  let s = 0;
  for (let i = 1; i <= k; i++) s += Math.log(n - k + i) - Math.log(i);
  return s;
}

/** P(X ≥ k) for X ~ Binomial(n, p): the one-sided p-value of k successes or more under the null p. */
export function binomialUpperTail(k: number, n: number, p = 0.5): number {
  if (k <= 0) return 1;
  if (k > n) return 0;
  const terms: number[] = [];
  for (let j = k; j <= n; j++) terms.push(logChoose(n, j) + j * Math.log(p) + (n - j) * Math.log1p(-p));
  const m = Math.max(...terms);
  return Math.min(1, Math.exp(m) * terms.reduce((a, t) => a + Math.exp(t - m), 0));
}

/** Two-sided sign test: the p-value of `pos` positives among `n` nonzero values under a median of 0. */
export function signTest(pos: number, n: number): number {
  if (n === 0) return 1;
  return Math.min(1, 2 * binomialUpperTail(Math.max(pos, n - pos), n, 0.5));
}

/** Percentile bootstrap interval of mean(x) (95% by default): mean(x)/mean(1) resampled. */
export const bootstrapMeanCI = (
  x: ArrayLike<number>,
  reps: number,
  rand: () => number,
  level = 0.95,
): [number, number] => bootstrapRatioCI(x, new Float64Array(x.length).fill(1), reps, rand, level);
