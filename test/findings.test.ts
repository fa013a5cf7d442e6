// Findings never claim more than the numbers show: a patch no better than its random control is said to be
// indistinguishable from it, a LASSO selection that moves with the CV seed is called unstable, and
// coefficients at rounding level select nothing.
import { describe, expect, it } from "vitest";
import type { AttributionEntry } from "../src/analysis/schema.js";
import { findings } from "../src/analysis/findings.js";
import { ciAt, sparseVerdict } from "../src/analysis/verdict.js";
import { pct } from "../src/analysis/words.js";
import { lassoStage } from "../src/analysis/estimators.js";
import { patchingEntries } from "../src/analysis/recovery.js";
import { resolveSettings } from "../src/analysis/settings.js";
import { type PairRecord, type Results } from "../src/analysis/schema.js";
import { seededRandom, gaussian } from "../src/stats/stats.js";
import { useBackend } from "./helpers.js";

useBackend();

const s = resolveSettings({ bootstrap: 200 });

/** A Results with only what findings reads about patching and LASSO. */
function resultsWith(patching: Results["patching"], lasso: Results["lasso"] = null, gaps: number[] = []): Results {
  return {
    n_pairs: 40,
    num_layers: 2,
    hidden_size: 4,
    pairs: gaps.map(
      (gap) =>
        ({
          gap,
          margin: { base: 0, tuned: gap },
          logp: { base: { chosen: -10, rejected: -10 }, tuned: { chosen: gap - 10, rejected: -10 } },
        }) as PairRecord,
    ),
    summary: {
      mean_margin_base: 0,
      mean_margin_tuned: 1,
      mean_gap: 1,
      tuned_prefers_chosen: 0.5,
      base_prefers_chosen: 0.5,
    },
    patching,
    attribution: null,
    heads: null,
    position_map: null,
    lasso,
    probes: [],
    pca: null,
    cv: { folds: 5, fold_of_pair: [] },
    logit_lens: { layers: ["embed", "0", "1"], base: [0, 0, 0], tuned: [0, 0, 0] },
    mean_diff: new Float32Array(8),
    timings_ms: {},
  };
}

describe("findings and the random-direction control", () => {
  const rand = seededRandom(5);
  const gap = Array.from({ length: 40 }, () => 1 + 0.2 * gaussian(rand));
  const combos = [{ direction: "tuned->base" as const, site: "resid_post" as const, layer: 1 }];

  it("a real patch far above its control is reported as beating it, with the CI of the difference", () => {
    const real = gap.map((g) => 0.9 * g + 0.05 * gaussian(rand));
    const random = gap.map(() => 0.05 * gaussian(rand));
    const e = patchingEntries(combos, { real: [real], random: [random], meanAblation: [random] }, gap, false, s);
    expect(e[0]!.controls!.random_direction.real_minus_control_ci[0]).toBeGreaterThan(0.5);
    const line = findings(resultsWith(e, null, gap)).find((l) => l.startsWith("Patching"))!;
    expect(line).toMatch(
      /It beats a random direction of the same norm at that layer \(random recovers -?\d+\.\d%; real − random recovery 95% CI/,
    );
  });

  it("the peak's intervals are Bonferroni-corrected over every patch looked at, and say so", () => {
    const many = [0, 1, 2, 3, 4].flatMap((layer) =>
      (["resid_post", "mlp_out"] as const).map((site) => ({ direction: "tuned->base" as const, site, layer })),
    );
    const real = many.map((_, k) => gap.map((g) => (0.1 + 0.08 * k) * g + 0.4 * gaussian(rand)));
    const random = many.map(() => gap.map(() => 0.05 * gaussian(rand)));
    const e = patchingEntries(many, { real, random, meanAblation: random }, gap, false, s);
    const best = e.filter((x) => x.site === "mlp_out").reduce((a, b) => (b.recovery > a.recovery ? b : a));
    const [lo, hi] = ciAt(best.gains, gap, 1 - 0.05 / 10);
    const [lo95, hi95] = ciAt(best.gains, gap, 0.95);
    expect(hi - lo).toBeGreaterThan(hi95 - lo95);
    const line = findings(resultsWith(e, null, gap)).find((l) => l.startsWith("Patching mlp_out"))!;
    expect(line).toContain(`(99.5% CI, Bonferroni over the 10 patches ${pct(lo)}–${pct(hi)})`);
  });

  it("when the random direction recovers as much (real 86.9%-like, random 133.8%-like), the headline says not distinguishable", () => {
    const real = gap.map((g) => 0.87 * g + 0.3 * gaussian(rand));
    const random = gap.map((g) => 1.34 * g + 1.5 * gaussian(rand));
    const e = patchingEntries(combos, { real: [real], random: [random], meanAblation: [random] }, gap, false, s);
    const line = findings(resultsWith(e, null, gap)).find((l) => l.startsWith("Patching"))!;
    expect(line).toMatch(/NOT distinguishable from a random direction of the same norm/);
    expect(line).not.toMatch(/It beats/);
  });
});

describe("LASSO findings", () => {
  const record = (distance: number[], gap: number): PairRecord => ({ distance, gap }) as unknown as PairRecord;

  it("an exactly irrelevant column gets coefficient 0, and the selection is checked across CV seeds", () => {
    const rand = seededRandom(2);
    const recs = Array.from({ length: 60 }, () => {
      const d = [gaussian(rand), gaussian(rand), 1];
      return record(d, 2 * d[0]! + 0.1 * gaussian(rand));
    });
    const l = lassoStage(recs, 3, s)!;
    expect(l.coef[2]).toBe(0); // a constant column
    expect(l.nonzero_layers).toContain(0);
    expect(l.seed_sets.map((x) => x.seed)).toEqual([0, 1, 2, 3, 4]);
    expect(l.stable_across_seeds).toBe(l.seed_sets.every((x) => x.nonzero_layers.join() === l.nonzero_layers.join()));
  });

  it("a selection that changes with the CV seed is reported as unstable, naming both sets", () => {
    // pure noise: which columns survive depends on the folds
    let found: ReturnType<typeof lassoStage> = null;
    for (let seed = 0; seed < 20 && !found; seed++) {
      const rand = seededRandom(100 + seed);
      const recs = Array.from({ length: 25 }, () =>
        record([gaussian(rand), gaussian(rand), gaussian(rand), gaussian(rand)], gaussian(rand)),
      );
      const l = lassoStage(recs, 4, s)!;
      if (!l.stable_across_seeds) found = l;
    }
    expect(found).not.toBeNull();
    const line = findings(resultsWith([], found)).find((x) => x.startsWith("LASSO"))!;
    expect(line).toMatch(
      /The selection is unstable: it changes with the CV fold seed alone \(\{[\d, ]*\} at seed 0, \{[\d, ]*\} at seed \d\), so no layer set is a finding\./,
    );
  });
});

describe("LASSO without stability refits", () => {
  it("says the selection was not checked, rather than 'none selected in 80% of refits'", () => {
    const rand = seededRandom(4);
    const recs = Array.from({ length: 40 }, () => {
      const d = [gaussian(rand), gaussian(rand), gaussian(rand), gaussian(rand)];
      return { distance: d, gap: d[1]! + 0.2 * gaussian(rand) } as unknown as PairRecord;
    });
    const l = lassoStage(recs, 4, resolveSettings({ stabilityReps: 0 }))!;
    expect(l.nonzero_layers).toContain(1);
    expect(l.permutation!.p_value).toBeLessThan(0.05);
    // the selection as if it were the same at every CV seed: only the missing refits stand in the way
    const r = { ...resultsWith([], { ...l, nonzero_layers: [1], stable_across_seeds: true }), num_layers: 4 };
    expect(findings(r).find((x) => x.startsWith("LASSO"))).toContain("bootstrap refits: not checked (no refits)");
    expect(sparseVerdict(r)).toMatch(/Cannot tell: LASSO keeps layers 1, but no bootstrap refits were run/);
  });
});

describe("LASSO's permutation null", () => {
  const record = (distance: number[], gap: number): PairRecord => ({ distance, gap }) as unknown as PairRecord;
  const noise = (seed: number) => {
    const rand = seededRandom(300 + seed);
    return Array.from({ length: 30 }, () =>
      record([gaussian(rand), gaussian(rand), gaussian(rand), gaussian(rand)], gaussian(rand)),
    );
  };

  it("a planted column passes the permutation test and the findings say so", () => {
    const rand = seededRandom(9);
    const recs = Array.from({ length: 40 }, () => {
      const d = [gaussian(rand), gaussian(rand), gaussian(rand)];
      return record(d, d[1]! + 0.3 * gaussian(rand));
    });
    const l = lassoStage(recs, 3, s)!;
    expect(l.nonzero_layers).toContain(1);
    expect(l.permutation!.p_value).toBeLessThan(0.01);
    expect(l.permutation!.cv_mse).toBeLessThan(l.permutation!.null_median_mse);
    const line = findings(resultsWith([], l)).find((x) => x.startsWith("LASSO"))!;
    expect(line).toContain("The fit predicts the gaps better than with them shuffled across pairs (CV MSE");
  });

  it("on pure noise p is roughly uniform (few below 0.05), and a noise selection is 'not supported'", () => {
    const fits = Array.from({ length: 20 }, (_, k) => lassoStage(noise(k), 4, s)!);
    const ps = fits.map((l) => l.permutation!.p_value);
    expect(ps.filter((p) => p < 0.05).length).toBeLessThanOrEqual(3);
    expect(ps.filter((p) => p > 0.5).length).toBeGreaterThanOrEqual(5);
    const picked = fits.find((l) => l.nonzero_layers.length > 0 && l.permutation!.p_value >= 0.05);
    expect(picked).toBeDefined();
    const line = findings(resultsWith([], picked!)).find((x) => x.startsWith("LASSO"))!;
    expect(line).toMatch(/Not supported as a finding: the fit predicts the gaps no better than with them shuffled/);
    expect(sparseVerdict(resultsWith([], picked!))).toMatch(/^Verdict — is it sparse over layers\? Not supported/);
  });
});

describe("findings about attribution patching", () => {
  const entry = (site: string, layer: number, est: number, exact: number, r: number): AttributionEntry => ({
    direction: "tuned->base",
    site,
    layer,
    mean_estimate: est,
    recovery_estimate: est,
    exact: { recovery: exact, correlation: r, max_abs_error: 0.1 },
  });
  const withAttribution = (entries: AttributionEntry[]): Results => ({
    ...resultsWith([]),
    attribution: { entries, heads: { direction: "tuned->base", mean: [], recovery: [] }, heatmap: null },
  });

  it("says where estimates agree with the exact sweep, where they do not, and the largest recovery difference", () => {
    const lines = findings(
      withAttribution([
        entry("resid_post", 0, 0.1, 0.12, 0.99),
        entry("resid_post", 1, 0.5, 0.6, 0.95),
        entry("mlp_out", 0, 0.2, 0.2, 0.97),
        entry("mlp_out", 1, 0.3, 0.31, 0.42),
      ]),
    );
    expect(lines).toContain(
      "Attribution patching agrees with the exact sweep for resid_post (tuned->base): correlation over pairs ≥ 0.950 at every layer.",
    );
    expect(lines).toContain(
      "Attribution patching of mlp_out (tuned->base) does NOT closely agree with the exact sweep: correlation over pairs 0.420 at layer 1; use the exact numbers there.",
    );
    expect(lines).toContain(
      "The largest gap between estimated and exact recovery is resid_post (tuned->base) at layer 1: 50.0% estimated vs 60.0% exact.",
    );
  });

  it("says nothing about agreement when there was no exact sweep to compare with", () => {
    const lines = findings(withAttribution([{ ...entry("resid_post", 0, 0.1, 0.1, 1), exact: null }]));
    expect(lines.some((l) => l.includes("Attribution"))).toBe(false);
  });
});
