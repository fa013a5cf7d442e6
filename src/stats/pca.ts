// PCA of activation differences, and the low-rank patch h_base + U_k U_kᵀ (h_tuned − h_base).
// The second-moment matrix DᵀD/N (or the Gram DDᵀ/N when there are fewer rows than columns) is formed on
// tfjs; its eigendecomposition is Householder tridiagonalization and implicit QR in float64. The PCA is uncentered on purpose: the patch must
// span the differences themselves, their mean direction included.
import * as tf from "@tensorflow/tfjs-core";
import { readValues } from "../model/read.js";
import { gaussian } from "./stats.js";

/**
 * Eigenvalues (descending) and unit eigenvectors (rows of `vectors`, n × n) of a symmetric matrix, in float64:
 * Householder reduction to tridiagonal form, then implicit QR steps with Wilkinson shifts (Golub & Van Loan,
 * Matrix Computations, 8.3), both accumulated into the eigenvectors. About 10 n³ operations: seconds at the
 * 1B model's width (2048), where cyclic Jacobi took tens of minutes.
 */
export function symmetricEigen(
  A: Float64Array,
  n: number,
  opts: { maxSweeps?: number } = {},
): { values: Float64Array; vectors: Float64Array } {
  const a = Float64Array.from(A);
  // qt: the accumulated orthogonal transform, transposed (row i = column i of Q), so every update runs along rows
  const qt = new Float64Array(n * n);
  for (let i = 0; i < n; i++) qt[i * n + i] = 1;
  const v = new Float64Array(n);
  const p = new Float64Array(n);
  const s = new Float64Array(n);
  for (let k = 0; k < n - 2; k++) {
    // Householder reflector P = I − β v vᵀ on indices k+1 … n−1 that maps a[k+1.., k] to α e₁
    const m = n - k - 1;
    let norm = 0;
    for (let i = 0; i < m; i++) norm += a[(k + 1 + i) * n + k]! ** 2;
    norm = Math.sqrt(norm);
    if (norm === 0) continue;
    const x0 = a[(k + 1) * n + k]!;
    const alpha = x0 > 0 ? -norm : norm;
    for (let i = 0; i < m; i++) v[i] = a[(k + 1 + i) * n + k]!;
    v[0]! -= alpha;
    let vv = 0;
    for (let i = 0; i < m; i++) vv += v[i]! * v[i]!;
    if (vv === 0) continue;
    const beta = 2 / vv;
    // A22 ← P A22 P = A22 − v wᵀ − w vᵀ with p = β A22 v, w = p − (β pᵀv / 2) v
    let pv = 0;
    for (let i = 0; i < m; i++) {
      let acc = 0;
      const row = (k + 1 + i) * n + k + 1;
      for (let j = 0; j < m; j++) acc += a[row + j]! * v[j]!;
      p[i] = beta * acc;
      pv += p[i]! * v[i]!;
    }
    const K = (beta * pv) / 2;
    for (let i = 0; i < m; i++) p[i]! -= K * v[i]!;
    for (let i = 0; i < m; i++) {
      const row = (k + 1 + i) * n + k + 1;
      const vi = v[i]!;
      const wi = p[i]!;
      for (let j = 0; j < m; j++) a[row + j]! -= vi * p[j]! + wi * v[j]!;
    }
    a[(k + 1) * n + k] = a[k * n + k + 1] = alpha;
    for (let i = 1; i < m; i++) a[(k + 1 + i) * n + k] = a[k * n + k + 1 + i] = 0;
    // Q ← Q P: rows k+1 … of qt less β v (vᵀ those rows)
    s.fill(0);
    for (let i = 0; i < m; i++) {
      const row = (k + 1 + i) * n;
      const vi = v[i]!;
      if (vi !== 0) for (let c = 0; c < n; c++) s[c]! += vi * qt[row + c]!;
    }
    for (let i = 0; i < m; i++) {
      const row = (k + 1 + i) * n;
      const f = beta * v[i]!;
      if (f !== 0) for (let c = 0; c < n; c++) qt[row + c]! -= f * s[c]!;
    }
  }
  const d = Float64Array.from({ length: n }, (_, i) => a[i * n + i]!);
  const e = Float64Array.from({ length: Math.max(0, n - 1) }, (_, i) => a[(i + 1) * n + i]!);
  const small = (i: number) =>
    Math.abs(e[i]!) <= 1e-15 * (Math.abs(d[i]!) + Math.abs(d[i + 1]!)) || Math.abs(e[i]!) < 1e-300;
  const limit = (opts.maxSweeps ?? 100) * Math.max(1, n);
  let steps = 0;
  for (let q = n - 1; q > 0 && steps < limit;) {
    if (small(q - 1)) {
      e[q - 1] = 0;
      q--;
      continue;
    }
    let lo = q - 1;
    while (lo > 0 && !small(lo - 1)) lo--;
    // one implicit QR step on the block lo … q, shifted by the eigenvalue of its trailing 2×2 nearer d[q]
    const delta = (d[q - 1]! - d[q]!) / 2;
    const b2 = e[q - 1]! * e[q - 1]!;
    const mu = d[q]! - b2 / (delta + (delta >= 0 ? 1 : -1) * Math.hypot(delta, e[q - 1]!));
    let x = d[lo]! - mu;
    let z = e[lo]!;
    for (let k = lo; k < q; k++) {
      // the rotation G = [[c, s], [−s, c]] on rows/columns k, k+1 with G [x; z] = [r; 0]
      const r = Math.hypot(x, z);
      const c = r === 0 ? 1 : x / r;
      const sn = r === 0 ? 0 : z / r;
      if (k > lo) e[k - 1] = r;
      const [dk, dk1, ek] = [d[k]!, d[k + 1]!, e[k]!];
      d[k] = c * c * dk + 2 * c * sn * ek + sn * sn * dk1;
      d[k + 1] = sn * sn * dk - 2 * c * sn * ek + c * c * dk1;
      e[k] = c * sn * (dk1 - dk) + (c * c - sn * sn) * ek;
      if (k < q - 1) {
        x = e[k]!;
        z = sn * e[k + 1]!; // the bulge at (k+2, k)
        e[k + 1] = c * e[k + 1]!;
      }
      const r0 = k * n;
      const r1 = (k + 1) * n;
      for (let i = 0; i < n; i++) {
        const u = qt[r0 + i]!;
        const w = qt[r1 + i]!;
        qt[r0 + i] = c * u + sn * w;
        qt[r1 + i] = c * w - sn * u;
      }
    }
    steps++;
  }
  const order = Array.from({ length: n }, (_, i) => i).sort((x, y) => d[y]! - d[x]!);
  const values = Float64Array.from(order, (i) => d[i]!);
  const vectors = new Float64Array(n * n);
  order.forEach((row, r) => vectors.set(qt.subarray(row * n, (row + 1) * n), r * n));
  return { values, vectors };
}

/** Principal directions of the rows of D (N × H): components (k × H, orthonormal rows) and variance ratios. */
export interface PcaResult {
  components: Float32Array; // rank × H, row-major
  rank: number; // number of components returned: eigenvalues above RANK_TOL of the largest
  eigenvalues: number[]; // of DᵀD/N, descending (length = rank)
  explainedVarianceRatio: number[];
}

/** Eigenvalues at or below this fraction of the largest count as zero (float32 products carry ~1e-7 relative error). */
export const RANK_TOL = 1e-6;

/** PCA (uncentered) of difference rows D [N, H]: the directions of non-zero variance (rank ≤ min(N, H)). */
export function pcaOfDifferences(D: tf.Tensor2D): PcaResult {
  const [N, H] = D.shape;
  const useGram = N < H;
  const m = useGram ? N : H;
  const M = Float64Array.from(
    readValues(() => tf.div(useGram ? tf.matMul(D, D, false, true) : tf.matMul(D, D, true, false), N)),
  );
  // symmetrize the float32 product exactly
  for (let i = 0; i < m; i++)
    for (let j = i + 1; j < m; j++) M[i * m + j] = M[j * m + i] = (M[i * m + j]! + M[j * m + i]!) / 2;
  const { values, vectors } = symmetricEigen(M, m);
  const total = values.reduce((s, x) => s + Math.max(0, x), 0);
  // directions whose variance is float32 noise are dropped: through the Gram matrix they would be rounding
  // errors scaled to unit length, arbitrary directions that change from run to run
  const rank = Math.max(1, values.filter((v) => v > RANK_TOL * Math.max(values[0]!, 0)).length);
  let components: Float32Array;
  if (!useGram) components = Float32Array.from(vectors.subarray(0, rank * m));
  else {
    // v = Dᵀu / ‖Dᵀu‖ for each Gram eigenvector u with a positive eigenvalue
    const U = tf.tensor2d(Float32Array.from(vectors.subarray(0, rank * m)), [rank, m]);
    components = readValues(() => {
      const V = tf.matMul(U, D); // [rank, H]
      return tf.div(V, tf.maximum(tf.norm(V, 2, 1, true), 1e-30));
    });
    U.dispose();
  }
  return {
    components,
    rank,
    eigenvalues: Array.from(values.subarray(0, rank)),
    explainedVarianceRatio: Array.from(values.subarray(0, rank), (v) => (total > 0 ? Math.max(0, v) / total : 0)),
  };
}

/** A random k-dimensional orthonormal basis of R^H ([k, H]) by Gram–Schmidt on Gaussian rows. */
export function randomSubspace(k: number, H: number, rand: () => number): tf.Tensor2D {
  const rows: Float64Array[] = [];
  while (rows.length < k) {
    const v = Float64Array.from({ length: H }, () => gaussian(rand));
    for (const r of rows) {
      let d = 0;
      for (let j = 0; j < H; j++) d += v[j]! * r[j]!;
      for (let j = 0; j < H; j++) v[j]! -= d * r[j]!;
    }
    const norm = Math.sqrt(v.reduce((s, x) => s + x * x, 0));
    if (norm > 1e-8) rows.push(v.map((x) => x / norm));
  }
  const out = new Float32Array(k * H);
  rows.forEach((r, i) => out.set(r, i * H));
  return tf.tensor2d(out, [k, H]);
}
