// Small statistical helpers: a seeded RNG, shuffles, K-fold splits, standardization, bootstrap intervals.

/** Deterministic PRNG (mulberry32) returning floats in [0, 1). */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * A seed for tfjs's random ops from integer parts, never 0: tfjs treats a seed of 0 as "no seed" and draws
 * from Math.random, which would make a seeded run irreproducible.
 */
export function tfSeed(...parts: number[]): number {
  let h = 0x811c9dc5;
  for (const p of parts) h = Math.imul(h ^ (p >>> 0), 0x01000193) >>> 0;
  return (h % 2147483646) + 1;
}

/** A standard normal draw (Box–Muller) from a uniform source. */
export function gaussian(rand: () => number): number {
  const u = 1 - rand();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rand());
}

/** A seeded random permutation of 0 … n−1. */
export function permutation(n: number, rand: () => number): number[] {
  const p = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [p[i], p[j]] = [p[j]!, p[i]!];
  }
  return p;
}

/** Fold index (0 … k−1) of each of n items, balanced, in a seeded random order. */
export function kFolds(n: number, k: number, rand: () => number): number[] {
  const fold = new Array<number>(n);
  permutation(n, rand).forEach((item, pos) => (fold[item] = pos % k));
  return fold;
}

export const mean = (xs: ArrayLike<number>): number => {
  let s = 0;
  for (let i = 0; i < xs.length; i++) s += xs[i]!;
  return xs.length ? s / xs.length : NaN;
};

/** Pearson correlation of two equal-length series; NaN when either is constant or shorter than 2. */
export function pearson(a: ArrayLike<number>, b: ArrayLike<number>): number {
  const n = a.length;
  if (n !== b.length) throw new Error(`pearson: lengths ${n} and ${b.length}`);
  if (n < 2) return NaN;
  const ma = mean(a);
  const mb = mean(b);
  let sab = 0;
  let saa = 0;
  let sbb = 0;
  for (let i = 0; i < n; i++) {
    const x = a[i]! - ma;
    const y = b[i]! - mb;
    sab += x * y;
    saa += x * x;
    sbb += y * y;
  }
  return saa > 0 && sbb > 0 ? sab / Math.sqrt(saa * sbb) : NaN;
}

/** Column means and population standard deviations of a row-major n × p matrix. */
export function columnStats(X: Float64Array, n: number, p: number): { mu: Float64Array; sd: Float64Array } {
  const mu = new Float64Array(p);
  const sd = new Float64Array(p);
  for (let i = 0; i < n; i++) for (let j = 0; j < p; j++) mu[j]! += X[i * p + j]! / n;
  for (let i = 0; i < n; i++)
    for (let j = 0; j < p; j++) {
      const d = X[i * p + j]! - mu[j]!;
      sd[j]! += (d * d) / n;
    }
  for (let j = 0; j < p; j++) sd[j] = Math.sqrt(sd[j]!);
  return { mu, sd };
}

/** True when a column's spread is zero up to rounding relative to its scale (it then carries no signal). */
export const isConstant = (sd: number, mu: number): boolean => !(sd > 1e-12 * Math.max(1, Math.abs(mu)));

/** b + Σ_j w_j (x_j − μ_j)/σ_j for each row of X: a linear model fitted on standardized columns (constant columns skipped). */
export function standardizedLinear(
  X: Float64Array,
  n: number,
  p: number,
  w: ArrayLike<number>,
  b: number,
  mu: ArrayLike<number>,
  sd: ArrayLike<number>,
): Float64Array {
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    let z = b;
    for (let j = 0; j < p; j++)
      if (w[j] !== 0 && !isConstant(sd[j]!, mu[j]!)) z += (w[j]! * (X[i * p + j]! - mu[j]!)) / sd[j]!;
    out[i] = z;
  }
  return out;
}

/** Rows of X picked by index. */
export function pickRows(X: Float64Array, p: number, rows: number[]): Float64Array {
  const out = new Float64Array(rows.length * p);
  rows.forEach((r, i) => out.set(X.subarray(r * p, r * p + p), i * p));
  return out;
}

/** Percentile bootstrap interval of mean(a)/mean(b) over resampled items (95% by default). */
export function bootstrapRatioCI(
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  reps: number,
  rand: () => number,
  level = 0.95,
): [number, number] {
  const n = a.length;
  if (n === 0 || reps <= 0) return [NaN, NaN];
  const stats: number[] = [];
  for (let r = 0; r < reps; r++) {
    let sa = 0;
    let sb = 0;
    for (let i = 0; i < n; i++) {
      const j = Math.floor(rand() * n);
      sa += a[j]!;
      sb += b[j]!;
    }
    stats.push(sa / sb);
  }
  stats.sort((x, y) => x - y);
  const q = (f: number) => stats[Math.min(reps - 1, Math.max(0, Math.floor(f * reps)))]!;
  return [q((1 - level) / 2), q(1 - (1 - level) / 2)];
}

/** `count` log-spaced values from hi down to lo (inclusive). */
export function logSpace(hi: number, lo: number, count: number): number[] {
  if (count === 1) return [hi];
  return Array.from({ length: count }, (_, i) =>
    Math.exp(Math.log(hi) + ((Math.log(lo) - Math.log(hi)) * i) / (count - 1)),
  );
}
