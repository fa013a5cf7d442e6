// How the sentences print numbers: a share as a percentage, a quantity to three significant figures, a p-value.
export const pct = (x: number): string => `${(100 * x).toFixed(1)}%`;
export const num = (x: number): string =>
  Math.abs(x) >= 100 ? x.toFixed(0) : Math.abs(x) >= 1 ? x.toFixed(2) : x.toPrecision(3);
export const pValue = (p: number): string => (p < 1e-4 ? p.toExponential(1) : p.toPrecision(2));
