// L2-regularized logistic regression with scikit-learn's `LogisticRegression` objective:
//   minimize ½‖w‖² + C · Σᵢ log(1 + exp(−sᵢ (w·xᵢ + b))),  sᵢ = ±1, intercept b not penalized.
// L-BFGS in float64; the n × d products run on tfjs. Features are standardized with training statistics.
import * as tf from "@tensorflow/tfjs-core";
import { readValues } from "../model/read.js";
import { columnStats, isConstant, kFolds, mean, pickRows, seededRandom, standardizedLinear } from "./stats.js";

/** A fitted probe: weights in standardized feature units, intercept, and the standardization. */
export interface LogisticFit {
  w: number[];
  b: number;
  mu: number[];
  sd: number[];
  iterations: number;
  gradNorm: number;
}

const log1pExp = (z: number) => (z > 0 ? z + Math.log1p(Math.exp(-z)) : Math.log1p(Math.exp(z)));
const sigmoid = (z: number) => (z >= 0 ? 1 / (1 + Math.exp(-z)) : Math.exp(z) / (1 + Math.exp(z)));

/** Minimizes a smooth function with L-BFGS and a backtracking Armijo line search. */
export function lbfgs(
  fg: (x: Float64Array) => { f: number; g: Float64Array },
  x0: Float64Array,
  opts: { maxIter?: number; gtol?: number; m?: number } = {},
): { x: Float64Array; iterations: number; gradNorm: number } {
  const m = opts.m ?? 10;
  const gtol = opts.gtol ?? 1e-9;
  const n = x0.length;
  const dot = (a: Float64Array, b: Float64Array) => {
    let s = 0;
    for (let i = 0; i < n; i++) s += a[i]! * b[i]!;
    return s;
  };
  let x = Float64Array.from(x0);
  let { f, g } = fg(x);
  const S: Float64Array[] = [];
  const Y: Float64Array[] = [];
  let it = 0;
  for (; it < (opts.maxIter ?? 2000); it++) {
    const gn = Math.sqrt(dot(g, g));
    if (gn <= gtol * Math.max(1, Math.abs(f))) break;
    // two-loop recursion: d = −H g
    const q = Float64Array.from(g);
    const alphas: number[] = [];
    for (let i = S.length - 1; i >= 0; i--) {
      const a = dot(S[i]!, q) / dot(Y[i]!, S[i]!);
      alphas[i] = a;
      for (let j = 0; j < n; j++) q[j]! -= a * Y[i]![j]!;
    }
    const gamma = S.length
      ? dot(S[S.length - 1]!, Y[Y.length - 1]!) / dot(Y[Y.length - 1]!, Y[Y.length - 1]!)
      : 1 / Math.max(1, gn);
    for (let j = 0; j < n; j++) q[j]! *= gamma;
    for (let i = 0; i < S.length; i++) {
      const bta = dot(Y[i]!, q) / dot(Y[i]!, S[i]!);
      for (let j = 0; j < n; j++) q[j]! += S[i]![j]! * (alphas[i]! - bta);
    }
    const d = q.map((v) => -v);
    let slope = dot(g, d);
    if (!(slope < 0)) {
      // not a descent direction: restart from steepest descent
      S.length = 0;
      Y.length = 0;
      for (let j = 0; j < n; j++) d[j] = -g[j]!;
      slope = dot(g, d);
    }
    let step = 1;
    let next = fg(x.map((v, j) => v + step * d[j]!));
    while (next.f > f + 1e-4 * step * slope && step > 1e-20) {
      step /= 2;
      next = fg(x.map((v, j) => v + step * d[j]!));
    }
    const xNew = x.map((v, j) => v + step * d[j]!);
    const s = xNew.map((v, j) => v - x[j]!);
    const y = next.g.map((v, j) => v - g[j]!);
    if (dot(s, y) > 1e-12 * dot(y, y)) {
      S.push(s);
      Y.push(y);
      if (S.length > m) {
        S.shift();
        Y.shift();
      }
    }
    if (Math.abs(f - next.f) <= 1e-15 * Math.max(1, Math.abs(f)) && step < 1e-10) break;
    x = xNew;
    f = next.f;
    g = next.g;
  }
  return { x, iterations: it, gradNorm: Math.sqrt(dot(g, g)) };
}

/** Fits the probe on rows X (n × d, row-major) with labels 0/1. */
export function logisticFit(X: Float64Array, n: number, d: number, labels: ArrayLike<number>, C = 1): LogisticFit {
  const { mu, sd } = columnStats(X, n, d);
  const Xs = new Float32Array(n * d);
  for (let i = 0; i < n; i++)
    for (let j = 0; j < d; j++) Xs[i * d + j] = isConstant(sd[j]!, mu[j]!) ? 0 : (X[i * d + j]! - mu[j]!) / sd[j]!;
  const s = Float64Array.from({ length: n }, (_, i) => (labels[i] ? 1 : -1));
  const Xt = tf.tensor2d(Xs, [n, d]);
  try {
    const fg = (x: Float64Array) => {
      const b = x[d]!;
      const z = readValues(() => tf.matMul(Xt, tf.tensor2d(Float32Array.from(x.subarray(0, d)), [d, 1])));
      let f = 0;
      const r = new Float32Array(n); // ∂/∂zᵢ of the loss term, times C
      let gb = 0;
      for (let i = 0; i < n; i++) {
        const margin = s[i]! * (z[i]! + b);
        f += C * log1pExp(-margin);
        r[i] = -C * s[i]! * sigmoid(-margin);
        gb += r[i]!;
      }
      const gw = readValues(() => tf.matMul(Xt, tf.tensor2d(r, [n, 1]), true, false));
      const g = new Float64Array(d + 1);
      for (let j = 0; j < d; j++) {
        g[j] = gw[j]! + x[j]!;
        f += 0.5 * x[j]! * x[j]!;
      }
      g[d] = gb;
      return { f, g };
    };
    const res = lbfgs(fg, new Float64Array(d + 1), { gtol: 1e-8 });
    return {
      w: Array.from(res.x.subarray(0, d)),
      b: res.x[d]!,
      mu: Array.from(mu),
      sd: Array.from(sd),
      iterations: res.iterations,
      gradNorm: res.gradNorm,
    };
  } finally {
    Xt.dispose();
  }
}

/** Decision values w·standardize(x) + b for rows X. */
export function logisticDecision(fit: LogisticFit, X: Float64Array, n: number, d: number): Float64Array {
  return standardizedLinear(X, n, d, fit.w, fit.b, fit.mu, fit.sd);
}

/** Probe accuracies by K-fold CV where `groups[i]` keeps related rows (a pair's two rows) in one fold. */
export function probeCV(
  X: Float64Array,
  n: number,
  d: number,
  labels: number[],
  groups: number[],
  opts: { folds?: number; C?: number; seed?: number } = {},
): { accuracy: number; diffMeansAccuracy: number; folds: number } {
  const groupIds = [...new Set(groups)];
  const K = Math.max(2, Math.min(opts.folds ?? 5, groupIds.length));
  const gf = kFolds(groupIds.length, K, seededRandom(opts.seed ?? 0));
  const foldOfGroup = new Map(groupIds.map((g, i) => [g, gf[i]!]));
  let correct = 0;
  let correctDm = 0;
  let total = 0;
  for (let k = 0; k < K; k++) {
    const train = [...Array(n).keys()].filter((i) => foldOfGroup.get(groups[i]!) !== k);
    const test = [...Array(n).keys()].filter((i) => foldOfGroup.get(groups[i]!) === k);
    if (test.length === 0 || new Set(train.map((i) => labels[i])).size < 2) continue;
    const Xtr = pickRows(X, d, train);
    const Xte = pickRows(X, d, test);
    const fit = logisticFit(
      Xtr,
      train.length,
      d,
      train.map((i) => labels[i]!),
      opts.C ?? 1,
    );
    const z = logisticDecision(fit, Xte, test.length, d);
    test.forEach((i, t) => (correct += (z[t]! > 0 ? 1 : 0) === labels[i] ? 1 : 0));
    // difference of means: project on μ₁ − μ₀, threshold at the midpoint of the two class means
    const dir = new Float64Array(d);
    const m1 = train.filter((i) => labels[i] === 1);
    const m0 = train.filter((i) => labels[i] === 0);
    for (let j = 0; j < d; j++) dir[j] = mean(m1.map((i) => X[i * d + j]!)) - mean(m0.map((i) => X[i * d + j]!));
    const proj = (row: number, M: Float64Array) => {
      let s = 0;
      for (let j = 0; j < d; j++) s += dir[j]! * M[row * d + j]!;
      return s;
    };
    const mid = (mean(m1.map((i) => proj(i, X))) + mean(m0.map((i) => proj(i, X)))) / 2;
    test.forEach((i, t) => (correctDm += (proj(t, Xte) > mid ? 1 : 0) === labels[i] ? 1 : 0));
    total += test.length;
  }
  return { accuracy: total ? correct / total : NaN, diffMeansAccuracy: total ? correctDm / total : NaN, folds: K };
}
