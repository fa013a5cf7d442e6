// PCA of activation differences, and the low-rank patch h_base + U_k U_kᵀ (h_tuned − h_base).
// The second-moment matrix DᵀD/N (or the Gram DDᵀ/N when there are fewer rows than columns) is formed on
// tfjs; its eigendecomposition is cyclic Jacobi in float64. The PCA is uncentered on purpose: the patch must
// span the differences themselves, their mean direction included.
import * as tf from "@tensorflow/tfjs-core";
import { readValues } from "../model/read.js";
import { gaussian } from "./stats.js";

/** Eigenvalues (descending) and unit eigenvectors (rows of `vectors`, n × n) of a symmetric matrix. */
export function symmetricEigen(A: Float64Array, n: number, opts: { maxSweeps?: number } = {}): { values: Float64Array; vectors: Float64Array } {
  const a = Float64Array.from(A);
  const v = new Float64Array(n * n);
  for (let i = 0; i < n; i++) v[i * n + i] = 1;
  for (let sweep = 0; sweep < (opts.maxSweeps ?? 100); sweep++) {
    let off = 0;
    let total = 0;
    for (let i = 0; i < n; i++)
      for (let j = 0; j < n; j++) {
        total += a[i * n + j]! ** 2;
        if (i !== j) off += a[i * n + j]! ** 2;
      }
    if (off <= 1e-30 * total || off === 0) break;
    for (let p = 0; p < n - 1; p++)
      for (let q = p + 1; q < n; q++) {
        const apq = a[p * n + q]!;
        if (apq === 0) continue;
        const theta = (a[q * n + q]! - a[p * n + p]!) / (2 * apq);
        const t = Math.sign(theta || 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1);
        const s = t * c;
        for (let k = 0; k < n; k++) {
          const akp = a[k * n + p]!;
          const akq = a[k * n + q]!;
          a[k * n + p] = c * akp - s * akq;
          a[k * n + q] = s * akp + c * akq;
        }
        for (let k = 0; k < n; k++) {
          const apk = a[p * n + k]!;
          const aqk = a[q * n + k]!;
          a[p * n + k] = c * apk - s * aqk;
          a[q * n + k] = s * apk + c * aqk;
        }
        for (let k = 0; k < n; k++) {
          const vkp = v[k * n + p]!;
          const vkq = v[k * n + q]!;
          v[k * n + p] = c * vkp - s * vkq;
          v[k * n + q] = s * vkp + c * vkq;
        }
      }
  }
  const order = Array.from({ length: n }, (_, i) => i).sort((x, y) => a[y * n + y]! - a[x * n + x]!);
  const values = Float64Array.from(order, (i) => a[i * n + i]!);
  const vectors = new Float64Array(n * n);
  order.forEach((col, r) => {
    for (let k = 0; k < n; k++) vectors[r * n + k] = v[k * n + col]!;
  });
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
  const M = Float64Array.from(readValues(() => tf.div(useGram ? tf.matMul(D, D, false, true) : tf.matMul(D, D, true, false), N)));
  // symmetrize the float32 product exactly
  for (let i = 0; i < m; i++) for (let j = i + 1; j < m; j++) M[i * m + j] = M[j * m + i] = (M[i * m + j]! + M[j * m + i]!) / 2;
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
