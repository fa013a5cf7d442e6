// LASSO as scikit-learn's `Lasso`: minimize (1/(2n))‖y − Xw − b‖² + α‖w‖₁ on standardized columns (zero mean,
// unit population std; a constant column gets coefficient 0). Coordinate descent on the Gram matrix XᵀX/n and
// Xᵀy/n, which are computed on tfjs; α is chosen by K-fold CV over a log-spaced path.
import * as tf from "@tensorflow/tfjs-core";
import { readValues } from "../model/read.js";
import { columnStats, isConstant, kFolds, logSpace, pickRows, seededRandom, standardizedLinear } from "./stats.js";

/** One fitted model: coefficients in standardized units plus what is needed to predict raw rows. */
export interface LassoFit {
  alpha: number;
  coef: number[]; // per standardized column
  intercept: number; // = mean(y) in standardized coordinates
  mu: number[];
  sd: number[];
  iterations: number;
}

/** The result of choosing α by cross-validation, with the path and stability selection. */
export interface LassoCVResult {
  alpha: number;
  coef: number[];
  intercept: number;
  nonzero: number[]; // column indices with coef ≠ 0
  path: Array<{ alpha: number; cvMse: number; cvSe: number; nonzero: number }>;
  stability: number[]; // per column: fraction of bootstrap refits (at the chosen α) where it is non-zero
  folds: number;
}

interface Moments {
  G: Float64Array; // p × p: Xsᵀ Xs / n
  c: Float64Array; // p: Xsᵀ (y − ȳ) / n
  ybar: number;
  mu: Float64Array;
  sd: Float64Array;
  active: boolean[]; // non-constant columns
}

/** Standardizes X with its own statistics and forms XᵀX/n and Xᵀy/n on tfjs. */
function moments(X: Float64Array, n: number, p: number, y: Float64Array): Moments {
  const { mu, sd } = columnStats(X, n, p);
  const active = Array.from(sd, (s, j) => !isConstant(s, mu[j]!));
  let ybar = 0;
  for (let i = 0; i < n; i++) ybar += y[i]! / n;
  const Xs = new Float32Array(n * p);
  for (let i = 0; i < n; i++)
    for (let j = 0; j < p; j++) Xs[i * p + j] = active[j] ? (X[i * p + j]! - mu[j]!) / sd[j]! : 0;
  const yc = Float32Array.from(y, (v) => v - ybar);
  const Xt = tf.tensor2d(Xs, [n, p]);
  const G = readValues(() => tf.div(tf.matMul(Xt, Xt, true, false), n));
  const c = readValues(() => tf.div(tf.matMul(Xt, tf.tensor2d(yc, [n, 1]), true, false), n));
  Xt.dispose();
  return { G: Float64Array.from(G!), c: Float64Array.from(c!), ybar, mu, sd, active };
}

const soft = (z: number, a: number) => (z > a ? z - a : z < -a ? z + a : 0);

/** Coordinate descent from a warm start `w` (modified in place) until the largest update is below tol. */
function descend(m: Moments, alpha: number, w: Float64Array, tol = 1e-10, maxIter = 100_000): number {
  const p = w.length;
  for (let it = 1; it <= maxIter; it++) {
    let maxDelta = 0;
    for (let j = 0; j < p; j++) {
      if (!m.active[j]) continue;
      let r = m.c[j]!;
      for (let k = 0; k < p; k++) if (k !== j) r -= m.G[j * p + k]! * w[k]!;
      const next = soft(r, alpha) / m.G[j * p + j]!;
      maxDelta = Math.max(maxDelta, Math.abs(next - w[j]!));
      w[j] = next;
    }
    if (maxDelta < tol) return it;
  }
  return maxIter;
}

/** Largest useful α: above it every coefficient is zero. */
function alphaMax(m: Moments): number {
  let a = 0;
  m.c.forEach((v, j) => {
    if (m.active[j]) a = Math.max(a, Math.abs(v));
  });
  return a;
}

/** Fits the LASSO path (warm-started, largest α first) on one data set. */
export function lassoPath(X: Float64Array, n: number, p: number, y: Float64Array, alphas: number[]): LassoFit[] {
  const m = moments(X, n, p, y);
  const w = new Float64Array(p);
  return alphas.map((alpha) => {
    const iterations = descend(m, alpha, w);
    return { alpha, coef: Array.from(w), intercept: m.ybar, mu: Array.from(m.mu), sd: Array.from(m.sd), iterations };
  });
}

/** Fits one α. */
export function lassoFit(X: Float64Array, n: number, p: number, y: Float64Array, alpha: number): LassoFit {
  return lassoPath(X, n, p, y, [alpha])[0]!;
}

/** Predicts raw rows with a fit. */
export function lassoPredict(fit: LassoFit, X: Float64Array, n: number, p: number): Float64Array {
  return standardizedLinear(X, n, p, fit.coef, fit.intercept, fit.mu, fit.sd);
}

/** LASSO with α chosen by K-fold CV (minimum mean squared error), plus stability selection at that α. */
export function lassoCV(
  X: Float64Array,
  n: number,
  p: number,
  y: Float64Array,
  opts: { folds?: number; nAlphas?: number; eps?: number; seed?: number; stabilityReps?: number } = {},
): LassoCVResult {
  const K = Math.max(2, Math.min(opts.folds ?? 5, n));
  const rand = seededRandom(opts.seed ?? 0);
  const full = moments(X, n, p, y);
  const aMax = alphaMax(full);
  const alphas = aMax > 0 ? logSpace(aMax, aMax * (opts.eps ?? 1e-3), opts.nAlphas ?? 50) : [1];
  const fold = kFolds(n, K, rand);
  const errs: number[][] = alphas.map(() => []);
  for (let k = 0; k < K; k++) {
    const train = [...Array(n).keys()].filter((i) => fold[i] !== k);
    const test = [...Array(n).keys()].filter((i) => fold[i] === k);
    if (train.length < 2 || test.length === 0) continue;
    const fits = lassoPath(
      pickRows(X, p, train),
      train.length,
      p,
      Float64Array.from(train, (i) => y[i]!),
      alphas,
    );
    const Xte = pickRows(X, p, test);
    fits.forEach((f, a) => {
      const pred = lassoPredict(f, Xte, test.length, p);
      let se = 0;
      test.forEach((i, t) => (se += (pred[t]! - y[i]!) ** 2));
      errs[a]!.push(se / test.length);
    });
  }
  const path = alphas.map((alpha, a) => {
    const e = errs[a]!;
    const mu = e.reduce((s, v) => s + v, 0) / e.length;
    const sd = Math.sqrt(e.reduce((s, v) => s + (v - mu) ** 2, 0) / Math.max(1, e.length - 1));
    return { alpha, cvMse: mu, cvSe: sd / Math.sqrt(e.length), nonzero: 0 };
  });
  // coefficients at rounding level (|w| ≤ 1e-9·sd(y), in standardized units) are zero, not a selection
  const ySd = Math.sqrt(y.reduce((a, v) => a + (v - y.reduce((m, u) => m + u, 0) / n) ** 2, 0) / n);
  const tol = 1e-9 * (ySd > 0 ? ySd : 1);
  const clean = (f: LassoFit): LassoFit => ({ ...f, coef: f.coef.map((c) => (Math.abs(c) > tol ? c : 0)) });
  const fullPath = lassoPath(X, n, p, y, alphas).map(clean);
  fullPath.forEach((f, a) => (path[a]!.nonzero = f.coef.filter((c) => c !== 0).length));
  let best = 0;
  path.forEach((pt, a) => {
    if (pt.cvMse < path[best]!.cvMse) best = a;
  });
  const fit = fullPath[best]!;
  const reps = opts.stabilityReps ?? 100;
  const counts = new Array<number>(p).fill(0);
  for (let r = 0; r < reps; r++) {
    const rows = Array.from({ length: n }, () => Math.floor(rand() * n));
    const f = clean(
      lassoFit(
        pickRows(X, p, rows),
        n,
        p,
        Float64Array.from(rows, (i) => y[i]!),
        fit.alpha,
      ),
    );
    f.coef.forEach((c, j) => (counts[j]! += c !== 0 ? 1 : 0));
  }
  return {
    alpha: fit.alpha,
    coef: fit.coef,
    intercept: fit.intercept,
    nonzero: fit.coef.flatMap((c, j) => (c !== 0 ? [j] : [])),
    path,
    stability: counts.map((c) => (reps > 0 ? c / reps : NaN)),
    folds: K,
  };
}

/** The permutation null of a LASSO fit: its CV error against the same procedure on shuffled targets. */
export interface LassoPermutation {
  /** Shuffles run. */
  reps: number;
  /** The real fit's cross-validated MSE at its chosen α. */
  cv_mse: number;
  /** The median of the shuffled fits' CV MSE (each at its own CV-chosen α). */
  null_median_mse: number;
  /** (1 + shuffles whose CV MSE is ≤ the real one) / (1 + reps): small when the features predict y. */
  p_value: number;
  /** The mean number of columns the shuffled fits keep: how many a selection of noise alone makes. */
  null_mean_selected: number;
}

/**
 * Whether the columns predict y at all: the whole CV procedure (α path, same folds) re-run on y shuffled across
 * rows `reps` times. Shuffling breaks any link between a row's features and its target while keeping both
 * marginal distributions, so under "no link" the real CV error is exchangeable with the shuffled ones.
 */
export function lassoPermutationTest(
  X: Float64Array,
  n: number,
  p: number,
  y: Float64Array,
  opts: { folds?: number; seed?: number; reps?: number } = {},
): LassoPermutation {
  const minMse = (f: LassoCVResult) => f.path.find((pt) => pt.alpha === f.alpha)!.cvMse;
  const cvOpts = { folds: opts.folds, seed: opts.seed, stabilityReps: 0 };
  const real = minMse(lassoCV(X, n, p, y, cvOpts));
  const reps = opts.reps ?? 200;
  const rand = seededRandom((opts.seed ?? 0) + 7919);
  const nulls: number[] = [];
  let selected = 0;
  for (let r = 0; r < reps; r++) {
    const ys = Float64Array.from(y);
    for (let i = n - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1));
      [ys[i], ys[j]] = [ys[j]!, ys[i]!];
    }
    const f = lassoCV(X, n, p, ys, cvOpts);
    nulls.push(minMse(f));
    selected += f.nonzero.length;
  }
  const sorted = [...nulls].sort((a, b) => a - b);
  return {
    reps,
    cv_mse: real,
    null_median_mse: reps ? sorted[Math.floor((reps - 1) / 2)]! : NaN,
    p_value: (1 + nulls.filter((v) => v <= real).length) / (1 + reps),
    null_mean_selected: reps ? selected / reps : NaN,
  };
}
