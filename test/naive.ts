// Naive float64 reference estimators, written separately from src/analysis: slow, simple, obviously right.

/** Standardizes columns (population std); constant columns become 0. Returns the new matrix as rows. */
export function standardize(X: number[][]): number[][] {
  const n = X.length;
  const p = X[0]?.length ?? 0;
  const cols = Array.from({ length: p }, (_, j) => X.map((r) => r[j]!));
  const stats = cols.map((c) => {
    const m = c.reduce((a, b) => a + b, 0) / n;
    const s = Math.sqrt(c.reduce((a, b) => a + (b - m) ** 2, 0) / n);
    return { m, s };
  });
  return X.map((r) =>
    r.map((v, j) => (stats[j]!.s > 1e-12 * Math.max(1, Math.abs(stats[j]!.m)) ? (v - stats[j]!.m) / stats[j]!.s : 0)),
  );
}

/** LASSO by proximal gradient (ISTA) on standardized X: min (1/2n)‖y − ȳ − Xw‖² + α‖w‖₁. */
export function naiveLasso(X: number[][], y: number[], alpha: number, iters = 200000): number[] {
  const Z = standardize(X);
  const n = Z.length;
  const p = Z[0]!.length;
  const ybar = y.reduce((a, b) => a + b, 0) / n;
  // step 1/L with L = largest eigenvalue of ZᵀZ/n, bounded by its trace
  let L = 0;
  for (const r of Z) for (const v of r) L += (v * v) / n;
  const step = 1 / Math.max(L, 1e-12);
  let w = new Array<number>(p).fill(0);
  for (let it = 0; it < iters; it++) {
    const resid = Z.map((r, i) => y[i]! - ybar - r.reduce((s, v, j) => s + v * w[j]!, 0));
    const grad = w.map((_, j) => -Z.reduce((s, r, i) => s + r[j]! * resid[i]!, 0) / n);
    const next = w.map((wj, j) => {
      const z = wj - step * grad[j]!;
      return Math.sign(z) * Math.max(0, Math.abs(z) - step * alpha);
    });
    const delta = Math.max(...next.map((v, j) => Math.abs(v - w[j]!)));
    w = next;
    if (delta < 1e-13) break;
  }
  return w;
}

/** Solves A x = b by Gaussian elimination with partial pivoting. */
export function solve(A: number[][], b: number[]): number[] {
  const n = b.length;
  const M = A.map((r, i) => [...r, b[i]!]);
  for (let c = 0; c < n; c++) {
    let piv = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(M[r]![c]!) > Math.abs(M[piv]![c]!)) piv = r;
    [M[c], M[piv]] = [M[piv]!, M[c]!];
    for (let r = c + 1; r < n; r++) {
      const f = M[r]![c]! / M[c]![c]!;
      for (let k = c; k <= n; k++) M[r]![k]! -= f * M[c]![k]!;
    }
  }
  const x = new Array<number>(n).fill(0);
  for (let r = n - 1; r >= 0; r--) {
    let s = M[r]![n]!;
    for (let k = r + 1; k < n; k++) s -= M[r]![k]! * x[k]!;
    x[r] = s / M[r]![r]!;
  }
  return x;
}

/** L2 logistic regression (sklearn objective, unpenalized intercept) by Newton's method on standardized X. */
export function naiveLogistic(X: number[][], labels: number[], C: number): { w: number[]; b: number } {
  const Z = standardize(X);
  const n = Z.length;
  const d = Z[0]!.length;
  let theta = new Array<number>(d + 1).fill(0); // w then b
  for (let it = 0; it < 100; it++) {
    const g = theta.map((t, j) => (j < d ? t : 0));
    const Hm = Array.from({ length: d + 1 }, (_, i) =>
      Array.from({ length: d + 1 }, (_, j) => (i === j && i < d ? 1 : 0)),
    );
    for (let i = 0; i < n; i++) {
      const x = [...Z[i]!, 1];
      const z = x.reduce((s, v, j) => s + v * theta[j]!, 0);
      const pr = 1 / (1 + Math.exp(-z));
      for (let a = 0; a <= d; a++) {
        g[a]! += C * (pr - labels[i]!) * x[a]!;
        for (let b = 0; b <= d; b++) Hm[a]![b]! += C * pr * (1 - pr) * x[a]! * x[b]!;
      }
    }
    const step = solve(Hm, g);
    theta = theta.map((t, j) => t - step[j]!);
    if (Math.max(...step.map(Math.abs)) < 1e-12) break;
  }
  return { w: theta.slice(0, d), b: theta[d]! };
}

/** Top eigenpairs of a symmetric matrix by power iteration with deflation. */
export function naiveTopEigen(A: number[][], k: number): Array<{ value: number; vector: number[] }> {
  const n = A.length;
  const M = A.map((r) => r.slice());
  const out: Array<{ value: number; vector: number[] }> = [];
  for (let c = 0; c < k; c++) {
    let v = Array.from({ length: n }, (_, i) => Math.sin(i + 1 + c));
    let lambda = 0;
    for (let it = 0; it < 20000; it++) {
      const w = M.map((r) => r.reduce((s, x, j) => s + x * v[j]!, 0));
      const norm = Math.sqrt(w.reduce((s, x) => s + x * x, 0));
      if (norm === 0) break;
      const next = w.map((x) => x / norm);
      const diff = Math.max(...next.map((x, i) => Math.abs(x - v[i]!)));
      v = next;
      lambda = norm;
      if (diff < 1e-13) break;
    }
    out.push({ value: lambda, vector: v });
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) M[i]![j]! -= lambda * v[i]! * v[j]!;
  }
  return out;
}
