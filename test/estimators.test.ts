// LASSO, logistic regression and PCA against naive float64 implementations (test/naive.ts) on random data,
// plus the identities each must satisfy.
import * as tf from "@tensorflow/tfjs-core";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { lassoCV, lassoFit } from "../src/stats/lasso.js";
import { logisticFit, probeCV } from "../src/stats/logistic.js";
import { pcaOfDifferences, randomSubspace, symmetricEigen } from "../src/stats/pca.js";
import { subspace } from "../src/analysis/patches.js";
import { seededRandom, gaussian, bootstrapRatioCI } from "../src/stats/stats.js";
import { naiveLasso, naiveLogistic, naiveTopEigen, standardize } from "./naive.js";
import { maxAbsDiff, useBackend } from "./helpers.js";

useBackend();

/** Random regression data with a sparse truth and optionally a constant column. */
const arbRegression = fc.record({
  n: fc.integer({ min: 8, max: 40 }),
  p: fc.integer({ min: 1, max: 8 }),
  seed: fc.integer({ min: 1, max: 1e9 }),
  constantCol: fc.boolean(),
  alphaFrac: fc.double({ min: 0.01, max: 0.9, noNaN: true }),
});
function makeRegression(n: number, p: number, seed: number, constantCol: boolean) {
  const r = seededRandom(seed);
  const X = Array.from({ length: n }, () => Array.from({ length: p }, () => gaussian(r) * (1 + r() * 3)));
  if (constantCol) for (const row of X) row[0] = 2.5;
  const y = X.map((row) => 3 * row[p - 1]! - (p > 2 ? 2 * row[1]! : 0) + gaussian(r) * 0.5 + 1);
  return { X, y, flatX: Float64Array.from(X.flat()), flatY: Float64Array.from(y) };
}

describe("LASSO", () => {
  it("matches proximal-gradient float64 LASSO and satisfies the KKT conditions", () => {
    fc.assert(
      fc.property(arbRegression, ({ n, p, seed, constantCol, alphaFrac }) => {
        const { X, y, flatX, flatY } = makeRegression(n, p, seed, constantCol);
        const Z = standardize(X);
        const ybar = y.reduce((a, b) => a + b, 0) / n;
        const aMax = Math.max(
          ...Array.from({ length: p }, (_, j) => Math.abs(Z.reduce((s, r, i) => s + r[j]! * (y[i]! - ybar), 0) / n)),
        );
        const alpha = Math.max(aMax * alphaFrac, 1e-6);
        const fit = lassoFit(flatX, n, p, flatY, alpha);
        const ref = naiveLasso(X, y, alpha);
        expect(maxAbsDiff(fit.coef, ref)).toBeLessThanOrEqual(1e-4 * Math.max(1, ...ref.map(Math.abs)));
        expect(fit.intercept).toBeCloseTo(ybar, 10);
        if (constantCol) expect(fit.coef[0]).toBe(0);
        // KKT: |Z_jᵀ r / n| ≤ α, with equality and matching sign where w_j ≠ 0
        const resid = Z.map((row, i) => y[i]! - ybar - row.reduce((s, v, j) => s + v * fit.coef[j]!, 0));
        for (let j = 0; j < p; j++) {
          const g = Z.reduce((s, row, i) => s + row[j]! * resid[i]!, 0) / n;
          if (fit.coef[j] !== 0)
            expect(Math.abs(g - alpha * Math.sign(fit.coef[j]!))).toBeLessThanOrEqual(1e-5 * Math.max(1, alpha));
          else expect(Math.abs(g)).toBeLessThanOrEqual(alpha * (1 + 1e-5) + 1e-7);
        }
        expect(fit.coef.every(Number.isFinite)).toBe(true);
      }),
      { numRuns: 40, seed: 11 },
    );
  });

  it("CV picks an α on the path, finds the true sparse support, and reports stability", () => {
    const { flatX, flatY } = makeRegression(120, 6, 5, true);
    const res = lassoCV(flatX, 120, 6, flatY, { folds: 5, seed: 1, stabilityReps: 30 });
    expect(res.path.map((p) => p.alpha)).toContain(res.alpha);
    expect(res.path.every((p) => Number.isFinite(p.cvMse))).toBe(true);
    const best = Math.min(...res.path.map((p) => p.cvMse));
    expect(res.path.find((p) => p.alpha === res.alpha)!.cvMse).toBe(best);
    expect(res.nonzero).toContain(5);
    expect(res.nonzero).toContain(1);
    expect(res.coef[0]).toBe(0); // constant column
    expect(res.stability[5]).toBe(1);
    expect(res.stability[0]).toBe(0);
    expect(res.stability.every((s) => s >= 0 && s <= 1)).toBe(true);
  });

  it("an all-constant design gives zero coefficients, not NaN", () => {
    const X = new Float64Array(20).fill(3);
    const res = lassoCV(
      X,
      10,
      2,
      Float64Array.from({ length: 10 }, (_, i) => i),
      { stabilityReps: 5 },
    );
    expect(res.coef).toEqual([0, 0]);
    expect(res.intercept).toBeCloseTo(4.5, 12);
  });
});

describe("logistic regression probe", () => {
  it("matches float64 Newton's method on sklearn's objective", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 10, max: 40 }),
        fc.integer({ min: 1, max: 6 }),
        fc.integer({ min: 1, max: 1e9 }),
        fc.constantFrom(0.1, 1, 10),
        (n, d, seed, C) => {
          const r = seededRandom(seed);
          const X = Array.from({ length: n }, () => Array.from({ length: d }, () => gaussian(r)));
          const labels = X.map((row, i) => (i < 2 ? i : row[0]! + gaussian(r) > 0 ? 1 : 0)); // both classes present
          const fit = logisticFit(Float64Array.from(X.flat()), n, d, labels, C);
          const ref = naiveLogistic(X, labels, C);
          const scale = Math.max(1, ...ref.w.map(Math.abs), Math.abs(ref.b));
          expect(maxAbsDiff(fit.w, ref.w)).toBeLessThanOrEqual(1e-4 * scale);
          expect(Math.abs(fit.b - ref.b)).toBeLessThanOrEqual(1e-4 * scale);
        },
      ),
      { numRuns: 30, seed: 3 },
    );
  });

  it("CV keeps a pair's rows together and separates separable classes", () => {
    const r = seededRandom(9);
    const n = 60;
    const d = 5;
    const X: number[] = [];
    const labels: number[] = [];
    const groups: number[] = [];
    for (let i = 0; i < n; i++) {
      const lab = i % 2;
      labels.push(lab);
      groups.push(Math.floor(i / 2));
      for (let j = 0; j < d; j++) X.push(gaussian(r) + (j === 0 ? 4 * lab : 0));
    }
    const res = probeCV(Float64Array.from(X), n, d, labels, groups, { folds: 5 });
    expect(res.accuracy).toBeGreaterThan(0.95);
    expect(res.diffMeansAccuracy).toBeGreaterThan(0.95);
    // labels that carry no information give chance-level accuracy
    const noise = probeCV(
      Float64Array.from({ length: n * d }, () => gaussian(r)),
      n,
      d,
      labels,
      groups,
      { folds: 5 },
    );
    expect(noise.accuracy).toBeLessThan(0.8);
  });
});

describe("PCA and low-rank patching", () => {
  it("eigendecomposition: A v = λ v, orthonormal vectors, descending values (repeated and zero eigenvalues too)", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 12 }), fc.integer({ min: 1, max: 1e9 }), (n, seed) => {
        const r = seededRandom(seed);
        const A = new Float64Array(n * n);
        for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) A[i * n + j] = A[j * n + i] = gaussian(r);
        const { values, vectors } = symmetricEigen(A, n);
        for (let k = 0; k < n; k++) {
          for (let i = 0; i < n; i++) {
            let av = 0;
            for (let j = 0; j < n; j++) av += A[i * n + j]! * vectors[k * n + j]!;
            expect(Math.abs(av - values[k]! * vectors[k * n + i]!)).toBeLessThan(1e-9);
          }
          for (let m = 0; m < n; m++) {
            let dot = 0;
            for (let j = 0; j < n; j++) dot += vectors[k * n + j]! * vectors[m * n + j]!;
            expect(Math.abs(dot - (k === m ? 1 : 0))).toBeLessThan(1e-9);
          }
          if (k > 0) expect(values[k]!).toBeLessThanOrEqual(values[k - 1]!);
        }
      }),
      { numRuns: 30 },
    );
  });

  it("eigendecomposition recovers a planted spectrum with repeated and zero eigenvalues (low-rank covariances)", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 40 }),
        fc.array(fc.constantFrom(0, 0, 1, 2.5, -3), { minLength: 40, maxLength: 40 }),
        fc.integer({ min: 1, max: 1e9 }),
        (n, lam, seed) => {
          const r = seededRandom(seed);
          // a random orthonormal basis (Gram–Schmidt), then A = U diag(λ) Uᵀ
          const U: number[][] = [];
          while (U.length < n) {
            const x = Array.from({ length: n }, () => gaussian(r));
            for (const u of U) {
              const d = x.reduce((acc, v, i) => acc + v * u[i]!, 0);
              for (let i = 0; i < n; i++) x[i]! -= d * u[i]!;
            }
            const nx = Math.hypot(...x);
            if (nx > 1e-6) U.push(x.map((v) => v / nx));
          }
          const A = new Float64Array(n * n);
          for (let i = 0; i < n; i++)
            for (let j = 0; j < n; j++) for (let k = 0; k < n; k++) A[i * n + j]! += U[k]![i]! * lam[k]! * U[k]![j]!;
          const { values, vectors } = symmetricEigen(A, n);
          const want = lam.slice(0, n).sort((x, y) => y - x);
          values.forEach((v, k) => expect(Math.abs(v - want[k]!)).toBeLessThan(1e-9));
          for (let k = 0; k < n; k++)
            for (let i = 0; i < n; i++) {
              let av = 0;
              for (let j = 0; j < n; j++) av += A[i * n + j]! * vectors[k * n + j]!;
              expect(Math.abs(av - values[k]! * vectors[k * n + i]!)).toBeLessThan(1e-9);
            }
        },
      ),
      { numRuns: 40, seed: 11 },
    );
  });

  it("matches power iteration on DᵀD/N, through both the covariance and the Gram route", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 2, max: 30 }),
        fc.integer({ min: 2, max: 12 }),
        fc.integer({ min: 1, max: 1e9 }),
        (N, H, seed) => {
          const r = seededRandom(seed);
          // decaying spectrum so the top directions are well separated
          const D = Array.from({ length: N }, () => Array.from({ length: H }, (_, j) => gaussian(r) * 3 ** -j));
          const Dt = tf.tensor2d(D);
          const res = pcaOfDifferences(Dt);
          Dt.dispose();
          const cov = Array.from({ length: H }, (_, i) =>
            Array.from({ length: H }, (_, j) => D.reduce((s, row) => s + row[i]! * row[j]!, 0) / N),
          );
          const k = Math.min(2, N, H);
          const ref = naiveTopEigen(cov, k);
          for (let c = 0; c < k; c++) {
            expect(Math.abs(res.eigenvalues[c]! - ref[c]!.value)).toBeLessThanOrEqual(
              1e-4 * Math.max(1, ref[0]!.value),
            );
            const dot = ref[c]!.vector.reduce((s, v, j) => s + v * res.components[c * H + j]!, 0);
            if (ref[c]!.value > 1e-3 * ref[0]!.value) expect(Math.abs(Math.abs(dot) - 1)).toBeLessThan(1e-3);
          }
          const sum = res.explainedVarianceRatio.reduce((a, b) => a + b, 0);
          expect(sum).toBeCloseTo(1, 5);
        },
      ),
      { numRuns: 30, seed: 5 },
    );
  });

  it("rank-r differences: r components explain everything and the rank-r patch is exact", () => {
    const r = seededRandom(4);
    const N = 50;
    const H = 16;
    const rank = 3;
    const basis = Array.from({ length: rank }, () => Array.from({ length: H }, () => gaussian(r)));
    const base = Array.from({ length: N }, () => Array.from({ length: H }, () => gaussian(r)));
    const diff = Array.from({ length: N }, () => {
      const c = basis.map(() => gaussian(r));
      return Array.from({ length: H }, (_, j) => basis.reduce((s, b, i) => s + c[i]! * b[j]!, 0));
    });
    const tuned = base.map((row, i) => row.map((v, j) => v + diff[i]![j]!));
    tf.tidy(() => {
      const p = pcaOfDifferences(tf.tensor2d(diff));
      const explained = p.explainedVarianceRatio.slice(0, rank).reduce((a, b) => a + b, 0);
      expect(explained).toBeGreaterThan(0.99999);
      const U = tf.tensor2d(p.components.subarray(0, rank * H), [rank, H]);
      const patched = subspace(1, U)(tf.tensor2d(base), tf.tensor2d(tuned), tf.ones([base.length, 1]));
      expect(maxAbsDiff(patched.dataSync(), tuned.flat())).toBeLessThan(1e-4);
      // a random rank-r subspace does not reproduce the difference
      const R = randomSubspace(rank, H, seededRandom(1));
      expect(maxAbsDiff(tf.matMul(R, R, false, true).dataSync(), tf.eye(rank).dataSync())).toBeLessThan(1e-5);
      const rnd = subspace(1, R)(tf.tensor2d(base), tf.tensor2d(tuned), tf.ones([base.length, 1]));
      expect(maxAbsDiff(rnd.dataSync(), tuned.flat())).toBeGreaterThan(0.1);
      // only the r directions with variance come back, by either route (N > H: covariance; N < H: Gram), and they
      // are orthonormal: the null directions would be rounding noise scaled to unit length
      for (const rows of [diff, diff.slice(0, 8)]) {
        const q = pcaOfDifferences(tf.tensor2d(rows));
        expect(q.rank).toBe(rank);
        expect(q.explainedVarianceRatio).toHaveLength(rank);
        const C = tf.tensor2d(q.components, [q.rank, H]);
        expect(maxAbsDiff(tf.matMul(C, C, false, true).dataSync(), tf.eye(rank).dataSync())).toBeLessThan(1e-5);
      }
    });
  });
});

describe("bootstrap", () => {
  it("the ratio CI brackets the point estimate and narrows with more data", () => {
    const r = seededRandom(2);
    const mk = (n: number) => Array.from({ length: n }, () => 1 + gaussian(r) * 0.3);
    const a1 = mk(20);
    const b1 = a1.map((v) => v * 2);
    const [lo, hi] = bootstrapRatioCI(a1, b1, 500, seededRandom(1));
    expect(lo).toBeCloseTo(0.5, 10);
    expect(hi).toBeCloseTo(0.5, 10);
    const a = mk(30);
    const b = mk(30);
    const a2 = mk(300);
    const b2 = mk(300);
    const [l1, h1] = bootstrapRatioCI(a, b, 500, seededRandom(1));
    const [l2, h2] = bootstrapRatioCI(a2, b2, 500, seededRandom(1));
    const point = a.reduce((s, v) => s + v, 0) / b.reduce((s, v) => s + v, 0);
    expect(l1).toBeLessThanOrEqual(point);
    expect(h1).toBeGreaterThanOrEqual(point);
    expect(h2 - l2).toBeLessThan(h1 - l1);
  });
});
