// Every verdict and headline sentence comes from a test with a null, and constructed cases get the honest
// sentence: identical responses (a gap of rounding alone), a negative mean gap, too few pairs, resid_post only,
// a single planted component, a change everywhere, probes at chance, gains that are 0 for every pair.
import { describe, expect, it } from "vitest";
import { findings } from "../src/analysis/findings.js";
import { choosePcaLayer } from "../src/analysis/lowrank.js";
import { patchingEntries } from "../src/analysis/recovery.js";
import type { PairRecord, ProbeResult, Results } from "../src/analysis/schema.js";
import { resolveSettings } from "../src/analysis/settings.js";
import { betterVerdict, lowRankVerdict, subspaceVsRandom, verdict, whereVerdict } from "../src/analysis/verdict.js";
import { binomialUpperTail, bootstrapMeanCI, signTest } from "../src/stats/tests.js";
import { gaussian, seededRandom } from "../src/stats/stats.js";
import { disposeDemo, loadDemo, useBackend } from "./helpers.js";

useBackend();

const s = resolveSettings({ bootstrap: 400 });
const L = 4;

/** Pair records with these gaps; log-probabilities of size ~`scale` nats (what the rounding bound scales with). */
function pairs(gaps: number[], scale = 30): PairRecord[] {
  return gaps.map((gap, i) => ({
    index: i,
    line: i + 1,
    tokens: { prompt: 5, chosen: 5, rejected: 5 },
    ids: { prompt: [], chosen: [], rejected: [] },
    logp: { base: { chosen: -scale, rejected: -scale }, tuned: { chosen: -scale + gap, rejected: -scale } },
    margin: { base: 0, tuned: gap },
    gap,
    distance: [],
    cosine_distance: [],
    gains: {},
    attribution: null,
    heads: null,
    random_direction: null,
    lens: { base: [], tuned: [] },
  }));
}

/** Results for `recs` with the patches `gains[site][layer]` (per pair) and a random control of noise. */
function results(
  recs: PairRecord[],
  gains: Partial<Record<"resid_post" | "attn_out" | "mlp_out", number[][]>>,
  probes: ProbeResult[] = [],
): Results {
  const rand = seededRandom(3);
  const combos = Object.entries(gains).flatMap(([site, perLayer]) =>
    perLayer.map((_, layer) => ({ direction: "tuned->base" as const, site: site as "attn_out", layer })),
  );
  const real = Object.values(gains).flatMap((perLayer) => perLayer);
  const random = real.map((g) => g.map(() => 0.02 * gaussian(rand)));
  const gap = recs.map((r) => r.gap);
  const mean = (x: number[]) => x.reduce((a, b) => a + b, 0) / x.length;
  return {
    n_pairs: recs.length,
    num_layers: L,
    hidden_size: 8,
    pairs: recs,
    summary: {
      mean_margin_base: 0,
      mean_margin_tuned: mean(gap),
      mean_gap: mean(gap),
      tuned_prefers_chosen: 0.5,
      base_prefers_chosen: 0.5,
    },
    patching: patchingEntries(combos, { real, random, meanAblation: random }, gap, false, s),
    attribution: null,
    heads: null,
    position_map: null,
    lasso: null,
    probes,
    pca: null,
    cv: { folds: 5, fold_of_pair: [] },
    logit_lens: { layers: ["embed", "0", "1", "2", "3"], base: [0, 0, 0, 0, 0], tuned: [0, 0, 0, 0, 0] },
    mean_diff: new Float32Array(L * 8),
    timings_ms: {},
  };
}

const rand = seededRandom(11);
const around = (m: number, sd: number, n: number) => Array.from({ length: n }, () => m + sd * gaussian(rand));

describe("the statistics the claims rest on", () => {
  it("the binomial tail and the sign test against exact small cases", () => {
    expect(binomialUpperTail(3, 3)).toBeCloseTo(1 / 8, 12);
    expect(binomialUpperTail(2, 3)).toBeCloseTo(4 / 8, 12);
    expect(binomialUpperTail(0, 5)).toBe(1);
    expect(signTest(10, 10)).toBeCloseTo(2 / 1024, 12);
    expect(signTest(5, 10)).toBe(1);
    expect(binomialUpperTail(140, 240)).toBeGreaterThan(0.004); // 58.3% of 240 is not far from chance
    expect(binomialUpperTail(140, 240)).toBeLessThan(0.006);
  });

  it("the bootstrap interval of a mean covers the mean, and shrinks with n", () => {
    const x = around(1, 1, 400);
    const [lo, hi] = bootstrapMeanCI(x, 2000, seededRandom(1));
    const m = x.reduce((a, b) => a + b, 0) / x.length;
    expect(lo).toBeLessThan(m);
    expect(hi).toBeGreaterThan(m);
    expect(hi - lo).toBeGreaterThan(0.15); // ±1.96/20
    expect(hi - lo).toBeLessThan(0.25);
  });
});

describe("the verdict", () => {
  it("identical responses: a gap of rounding alone is 'no gap', and nothing about where it is is said", () => {
    const recs = pairs(Array.from({ length: 5 }, (_, i) => (i % 2 ? 1.3e-6 : -0.9e-6) + 1.3e-6));
    const r = results(recs, { resid_post: Array.from({ length: L }, () => recs.map(() => 5e-6)) });
    expect(betterVerdict(recs).answer).toBe("no gap");
    const f = findings(r);
    expect(f[0]).toMatch(/No gap: the two models' margins differ by no more than float32 rounding/);
    expect(f.join(" ")).not.toMatch(/recovery peaks|beats a random|LASSO keeps|Low-rank patching/);
  });

  it("a negative mean gap says the tuned model is not better, and why recovery then means a loss brought back", () => {
    const recs = pairs(around(-2.8, 1, 30));
    const [line] = verdict(results(recs, {})).lines;
    expect(line).toMatch(
      /^Verdict — is the tuned model better on these pairs\? No: the tuned model's margin is lower \(mean gap -2\.\d+, 95% bootstrap CI/,
    );
    expect(line).toMatch(/not where a preference lives/);
    expect(verdict(results(recs, {})).lines).toHaveLength(1); // the other questions are not asked of a loss
    expect(findings(results(recs, {})).join(" ")).toMatch(
      /none of the lines below is evidence of where a preference lives/,
    );
  });

  it("too few pairs to tell", () => {
    const recs = pairs([1.5, -1.2, 0.4]);
    expect(betterVerdict(recs).answer).toBe("cannot tell");
    expect(betterVerdict(recs).line).toMatch(/Cannot tell with 3 pairs: fewer than 10 pairs decide nothing here/);
    // one pair, or three that all agree, give a zero-width or tiny interval: still nothing decided
    for (const few of [[21.48], [2, 2.1, 1.9]]) {
      expect(betterVerdict(pairs(few)).answer).toBe("cannot tell");
      expect(
        verdict(results(pairs(few), { mlp_out: [0, 1, 0, 0].map((f) => few.map((g) => f * g)) })).lines,
      ).toHaveLength(1);
    }
    // ten pairs, eight higher: the interval is above 0 but the sign test (p = 0.11) does not reject
    const ten = pairs([3, 2.5, 2, 2.2, 3.1, 2.8, 2.4, 2.6, -0.2, -0.1]);
    expect(betterVerdict(ten).line).toMatch(/Cannot tell with 10 pairs: the sign test does not reject/);
    expect(betterVerdict(pairs(around(2, 0.3, 10))).answer).toBe("yes");
    expect(findings(results(recs, {})).join(" ")).toMatch(
      /The gap is not established on these pairs \(verdict above\)/,
    );
  });

  it("resid_post alone cannot say where the change enters (its recovery rises with depth by construction)", () => {
    const recs = pairs(around(2, 0.3, 40));
    const rising = [0.2, 0.5, 0.8, 1].map((f) => recs.map((p) => f * p.gap));
    expect(whereVerdict(results(recs, { resid_post: rising }))).toMatch(
      /Cannot tell: only residual-stream sites were patched.*by construction/,
    );
    expect(findings(results(recs, { resid_post: rising })).join(" ")).toMatch(
      /rises with depth by construction and localizes nothing/,
    );
  });

  it("a change planted in one MLP is found there and nowhere else; a change everywhere is 'not localized'", () => {
    const recs = pairs(around(2, 0.3, 40));
    const zero = () => recs.map(() => 0.01 * gaussian(rand));
    const mlp = [zero(), zero(), recs.map((p) => 0.9 * p.gap + 0.05 * gaussian(rand)), zero()];
    const attn = [zero(), zero(), zero(), zero()];
    expect(whereVerdict(results(recs, { attn_out: attn, mlp_out: mlp }))).toMatch(
      /^Verdict — where does the change enter\? At mlp_out 2 \(1 of 8 component patches\)/,
    );
    const all = Array.from({ length: L }, () => recs.map((p) => 0.3 * p.gap + 0.02 * gaussian(rand)));
    expect(whereVerdict(results(recs, { attn_out: all, mlp_out: all }))).toMatch(
      /Not localized: 8 of 8 component patches/,
    );
    expect(whereVerdict(results(recs, { attn_out: attn, mlp_out: attn }))).toMatch(
      /Not supported: no single attn_out or mlp_out patch/,
    );
    // small contributions everywhere are significant with enough pairs, but none carries 10% of the gap: they
    // locate nothing, and the one that does is named alone
    const small = Array.from({ length: L }, () => recs.map((p) => 0.04 * p.gap + 0.002 * gaussian(rand)));
    const withOne = [...small.slice(0, 3), mlp[2]!];
    expect(whereVerdict(results(recs, { attn_out: small, mlp_out: withOne }))).toMatch(
      /At mlp_out 3 \(1 of 8 component patches\): each alone recovers at least 10\.0% of the gap and more than a random direction/,
    );
  });

  it("probes at chance are 'not supported', well above it are reported with their test", () => {
    const recs = pairs(around(2, 0.3, 30));
    const at = (acc: number): ProbeResult[] =>
      Array.from({ length: L }, (_, l) => ({
        model: "base",
        layer: l,
        accuracy: l === 0 ? acc : 0.5,
        diff_means_accuracy: 0.5,
      }));
    const chance = findings(results(recs, {}, at(35 / 60))).find((l) => l.startsWith("Linear probes"))!;
    expect(chance).toMatch(
      /not supported — the best layer \(0, 58\.3% cross-validated accuracy\) is not distinguishable from chance \(binomial p = .* Bonferroni over 4 probes\)/,
    );
    const strong = findings(results(recs, {}, at(0.95))).find((l) => l.startsWith("Linear probes"))!;
    expect(strong).toMatch(/95\.0% cross-validated accuracy, above chance \(binomial p = /);
    // both models separating them says something of the responses, not of the tuning
    const both = [...at(0.95), ...at(0.9).map((p) => ({ ...p, model: "tuned" as const }))];
    expect(findings(results(recs, {}, both)).join(" ")).toMatch(
      /Both models' activations separate chosen from rejected \(best base 95\.0%, tuned 90\.0%\): .* no evidence of what the tuning changed/,
    );
    expect(findings(results(recs, {}, at(0.95))).join(" ")).not.toMatch(/Both models/);
  });

  it("the logit lens flags a sign change only between depths where the gap is more than noise around 0", () => {
    const recs = pairs(around(2, 0.3, 20));
    const lensLine = (tuned: number[]) => {
      const r = results(recs, {});
      r.logit_lens = { layers: ["embed", "0", "1", "2", "3"], base: [0, 0, 0, 0, 0], tuned };
      return findings(r).find((l) => l.startsWith("Logit lens"))!;
    };
    expect(lensLine([-0.23, 2, 8, 12, 16.5])).not.toMatch(/changes sign/); // −0.23 of 16.5: noise
    expect(lensLine([-3, 2, 8, 12, 16.5])).toMatch(/changes sign across depths/);
  });

  it("attribution gains that are exactly 0 for every pair agree with an exact 0, not 'do NOT agree … NaN'", () => {
    const recs = pairs(around(2, 0.3, 10));
    const r = results(recs, {});
    const entry = (layer: number, correlation: number, max_abs_error: number) => ({
      direction: "tuned->base" as const,
      site: "resid_post" as const,
      layer,
      mean_estimate: 0,
      recovery_estimate: 0,
      exact: { recovery: 0, correlation, max_abs_error },
    });
    r.attribution = {
      entries: [entry(0, NaN, 0), entry(1, 0.99, 0.01)],
      heads: { direction: "tuned->base", mean: [], recovery: [] },
      heatmap: null,
    };
    const f = findings(r).join(" ");
    expect(f).toMatch(/Attribution patching agrees with the exact sweep for resid_post/);
    expect(f).not.toMatch(/NaN/);
    r.attribution.entries[0] = entry(0, NaN, 0.5);
    expect(findings(r).join(" ")).toMatch(/agreement with the exact sweep cannot be told at layer 0/);
  });

  it("the low-rank layer is never one where the two models' activations are identical, and such a PCA is 'not supported'", () => {
    const recs = pairs(around(2, 0.3, 20));
    const r = results(recs, { resid_post: [0.2, 0.97, 1, 0.4].map((f) => recs.map((p) => f * p.gap)) });
    expect(choosePcaLayer(r.patching, s, L).layer).toBe(1); // within 5% of the best (layer 2)
    expect(choosePcaLayer(r.patching, s, L, (l) => l !== 1 && l !== 2).layer).toBe(3);
    r.pca = {
      layer: 3,
      site: "resid_post",
      chosen_by: "test",
      train_pairs: [],
      test_pairs: [0, 1],
      n_rows: 10,
      explained_variance_ratio: [0, 0],
      recovery: [{ k: 1, k_used: 1, recovery: 0, random_subspace: 0 }],
      components: new Float32Array(8),
      k_90: 0,
      steering_vector: new Float32Array(8),
      steering: [],
    };
    expect(findings(r).join(" ")).toMatch(
      /Low-rank patching at layer 3: not supported — the two models' activations there do not differ/,
    );
    expect(findings(r).join(" ")).toMatch(
      /is it low-rank \(layer 3\)\? Cannot tell: the two models' activations at layer 3 do not differ/,
    );
  });
});

describe("low-rank and steering against their random controls", () => {
  /** Results whose PCA holds per-pair gains: top-k recovers `top` of each held-out gap, random `rnd` ± noise. */
  function withPca(top: number, rnd: number, noise: number, n = 30): Results {
    const recs = pairs(around(2, 0.3, n));
    const r = results(recs, { resid_post: [0.2, 0.5, 0.9, 1].map((f) => recs.map((p) => f * p.gap)) });
    const test = recs.map((_, i) => i).filter((i) => i % 2 === 1);
    const gains = (f: number, sd = noise) => test.map((j) => f * recs[j]!.gap + sd * gaussian(rand));
    const mean = (x: number[]) => x.reduce((a, b) => a + b, 0) / x.length;
    const gapMean = mean(test.map((j) => recs[j]!.gap));
    const row = (k: number, f: number, fr: number, sd = noise) => {
      const [g, gr] = [gains(f, sd), gains(fr, sd)];
      return {
        k,
        k_used: k,
        recovery: mean(g) / gapMean,
        random_subspace: mean(gr) / gapMean,
        gains: g,
        random_gains: gr,
      };
    };
    const steer = (name: string, f: number) => ({
      vector: name,
      norm: 1,
      by_strength: [1, 2].map((strength) => {
        const g = gains(f * strength);
        return { strength, mean_gain: mean(g), recovery: mean(g) / gapMean, gains: g };
      }),
    });
    r.pca = {
      layer: 2,
      site: "resid_post",
      chosen_by: "test",
      train_pairs: recs.map((_, i) => i).filter((i) => i % 2 === 0),
      test_pairs: test,
      n_rows: 30,
      explained_variance_ratio: [0.95, 0.05],
      recovery: [row(1, top, rnd), row(2, 1, 1), row(8, 1, 1, 0.01)],
      components: new Float32Array(16),
      k_90: 1,
      steering_vector: new Float32Array(8),
      steering: [steer("mean difference", top), steer("top-1", top), steer("random direction", rnd)],
    };
    return r;
  }

  it("a planted rank-1 change that a random direction does not carry is low-rank, with its test", () => {
    const r = withPca(0.95, 0.02, 0.05);
    expect(lowRankVerdict(r)).toMatch(
      /^Verdict — is it low-rank \(layer 2\)\? Yes: the top 1 of 8 directions recover .*; top-k − random recovery 98\.3% CI .* \(Bonferroni over 3 values of k\) is above 0\.$/,
    );
    const f = findings(r).join(" ");
    expect(f).toMatch(
      /for a random 1-dimensional subspace \(top-k − random 98\.3% CI [\d.]+%–[\d.]+% \(Bonferroni over 3 values of k\): above 0\)/,
    );
    expect(f).toMatch(/At β = 2 it beats the random direction \(difference 97\.5% CI/);
  });

  it("when a random subspace recovers as much, within noise, it is 'cannot tell', and steering is not preference-specific", () => {
    const r = withPca(0.95, 0.9, 1.5, 24);
    const t = subspaceVsRandom(r, r.pca!.recovery[0]!)!;
    expect(t.beats).toBe(false);
    expect(lowRankVerdict(r)).toMatch(/Cannot tell with 12 held-out pairs: .* includes 0\.$/);
    const f = findings(r).join(" ");
    expect(f).toMatch(/not distinguishable from the random subspace/);
    expect(f).toMatch(/it is not distinguishable from the random direction .*not shown to be preference-specific/);
  });

  it("says which k were tried, and 'cannot tell' when even the whole layer does not reach 90%", () => {
    const r = withPca(0.5, 0.02, 0.05);
    r.pca!.recovery[1] = { ...r.pca!.recovery[1]!, recovery: 0.6 };
    expect(lowRankVerdict(r)).toMatch(
      /No: none of the subspace sizes tried below the full width \(k = 1, 2\) recovers 90% of the held-out gap \(15 pairs\); the full width \(8\) recovers \d+\.\d%\.$/,
    );
    r.pca!.recovery[2] = { ...r.pca!.recovery[2]!, recovery: 0.471 };
    expect(lowRankVerdict(r)).toMatch(
      /Cannot tell: the whole layer's difference recovers only 47\.1% of the held-out gap here/,
    );
  });

  it("results written before per-pair gains were kept still get a verdict, named as point estimates", () => {
    const r = withPca(0.95, 0.02, 0.05);
    for (const x of r.pca!.recovery) delete x.gains;
    expect(lowRankVerdict(r)).toMatch(/Yes \(point estimates only/);
  });
});

describe("the verdict on the demo pair", () => {
  it("with chosen and rejected swapped in every other pair, it is not a 'yes', and no component is said to carry the change", async () => {
    const { runAnalysis } = await import("../src/analysis/run.js");
    const demo = loadDemo(24);
    try {
      const shuffled = demo.pairs.map((p, i) =>
        i % 2 ? { ...p, chosenIds: p.rejectedIds, rejectedIds: p.chosenIds } : p,
      );
      const r = await runAnalysis(demo.base, demo.tuned, shuffled, {
        bootstrap: 100,
        stabilityReps: 2,
        controls: false,
      });
      const [line] = verdict(r).lines;
      expect(line).toMatch(/^Verdict — is the tuned model better on these pairs\? (Cannot tell|No)/);
      expect(findings(r).join(" ")).toMatch(/none of (the lines below|them) is evidence of where a preference lives/);
      // the same pairs unshuffled: a clear yes
      const plain = await runAnalysis(demo.base, demo.tuned, demo.pairs, {
        bootstrap: 100,
        stabilityReps: 2,
        controls: false,
      });
      expect(verdict(plain).lines[0]).toMatch(/\? Yes: the tuned model's margin is higher/);
    } finally {
      disposeDemo(demo);
    }
  });
});
