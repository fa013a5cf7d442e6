// The headline findings of a run, in plain words computed from the numbers.
import { binomialUpperTail } from "../stats/tests.js";
import type { Results } from "./schema.js";
import { ciAt, MIN_PAIRS, permutationWords, steeringVsRandom, subspaceVsRandom, tried, verdict } from "./verdict.js";
import { num, pct, pValue } from "./words.js";
import type { TransferResult } from "./steering.js";

/** Sentences summarizing a run, most important first. */
export function findings(r: Results): string[] {
  const s = r.summary;
  const out = [
    `Over ${r.n_pairs} pairs the tuned model's mean margin is ${num(s.mean_margin_tuned)} vs the base model's ${num(s.mean_margin_base)} ` +
      `(mean gap ${num(s.mean_gap)}); the tuned model prefers the chosen response in ${pct(s.tuned_prefers_chosen)} of pairs, the base in ${pct(s.base_prefers_chosen)}.`,
  ];
  const noGap = r.patching.length > 0 && r.patching.every((p) => Number.isNaN(p.recovery));
  if (noGap)
    out.push(
      "The two models' margins do not differ (mean gap at rounding level), so there is no gap to recover: recovery ratios are not reported.",
    );
  const { better, lines } = verdict(r);
  // a gap of rounding alone localizes nothing: no sentence about where it is
  if (better === "no gap") return [...lines, ...out, ...probeFindings(r)];
  // without an established gap the lines below describe numbers; they are no evidence of where a preference lives
  if (better !== "yes")
    out.push(
      better === "no"
        ? "The tuned model is worse on these pairs (verdict above): every recovery below is how much of a loss a patch brings back, and none of the lines below is evidence of where a preference lives."
        : "The gap is not established on these pairs (verdict above): the lines below describe the numbers, and none of them is evidence of where a preference lives.",
    );
  return [
    ...lines,
    ...out,
    ...patchingFindings(r),
    ...attributionFindings(r),
    ...lassoFindings(r),
    ...probeFindings(r),
    ...lowRankFindings(r),
    ...lensFindings(r),
  ];
}

/** Per site and direction: where recovery peaks, the first layer at 90%, and the controls. */
function patchingFindings(r: Results): string[] {
  const out: string[] = [];
  // the peak is picked among every exact patch looked at, so its CIs are Bonferroni-corrected over all of them
  const looked = r.patching.filter((p) => Number.isFinite(p.recovery)).length;
  const level = 1 - 0.05 / Math.max(1, looked);
  const gaps = r.pairs.map((p) => p.gap);
  const named = looked > 1 ? `${pct(level)} CI, Bonferroni over the ${looked} patches` : "95% CI";
  const few = gaps.length < MIN_PAIRS;
  for (const dir of ["tuned->base", "base->tuned"] as const) {
    for (const site of ["resid_post", "resid_pre", "attn_out", "mlp_out"] as const) {
      const e = r.patching.filter((p) => p.direction === dir && p.site === site && Number.isFinite(p.recovery));
      if (!e.length) continue;
      const best = e.reduce((a, b) => (b.recovery > a.recovery ? b : a));
      const first90 = e.find((p) => p.recovery >= 0.9);
      const [lo, hi] = ciAt(best.gains, gaps, level);
      const ci = few ? ` (no interval: ${gaps.length} pairs)` : ` (${named} ${pct(lo)}–${pct(hi)})`;
      const how =
        best.method === "attribution" ? " [attribution estimates: first-order, no exact patches and no controls]" : "";
      const win =
        best.window > 1
          ? ` in windows of ${best.window} consecutive layers (a layer l below is the window l … l+${best.window - 1})`
          : "";
      let line = `Patching ${site} (${dir})${win}${how}: recovery peaks at layer ${best.layer} with ${pct(best.recovery)} of the gap${ci}`;
      if (site === "resid_post")
        line = `${line} (a resid_post patch carries every change made below it, so this rises with depth by construction and localizes nothing by itself)`;
      line += first90 ? `; layer ${first90.layer} is the first to recover ≥ 90%.` : "; no single layer recovers 90%.";
      if (best.controls) {
        const rnd = best.controls.random_direction;
        const [dLo, dHi] = ciAt(
          best.gains.map((v, i) => v - rnd.gains[i]!),
          gaps,
          level,
        );
        const beats = dLo > 0;
        const diff = `real − random recovery ${named} ${pct(dLo)}–${pct(dHi)}`;
        const rndMax = Math.max(...e.map((p) => Math.abs(p.controls!.random_direction.recovery)));
        line += few
          ? ` A random direction of the same norm recovers ${pct(rnd.recovery)} at that layer; with ${gaps.length} pairs (fewer than ${MIN_PAIRS}) the two cannot be told apart.`
          : beats
            ? ` It beats a random direction of the same norm at that layer (random recovers ${pct(rnd.recovery)}; ${diff}).`
            : ` This is NOT distinguishable from a random direction of the same norm, which recovers ${pct(rnd.recovery)} at that layer (${diff}): the patching result does not show a preference-specific direction.`;
        const abl = best.controls.mean_ablation.recovery;
        const damage =
          Math.abs(abl) > 1
            ? " (more than the whole gap: replacing the site by its dataset mean damages the model, which says nothing of where the preference is)"
            : "";
        line += ` Mean-ablation recovers ${pct(abl)}${damage}; the largest random-direction |recovery| over layers is ${pct(rndMax)}.`;
      }
      out.push(line);
    }
  }
  return out;
}

/** The LASSO selection and its stability. */
function lassoFindings(r: Results): string[] {
  const out: string[] = [];
  if (r.lasso) {
    const nz = r.lasso.nonzero_layers;
    const stable = r.lasso.stability
      .map((v, l) => [l, v] as const)
      .filter(([, v]) => v >= 0.8)
      .map(([l]) => l);
    const set = (xs: number[]) => `{${xs.join(", ")}}`;
    let line = nz.length
      ? `LASSO (α = ${num(r.lasso.alpha)} by ${r.lasso.folds}-fold CV) regressing the per-pair gap on per-layer activation distances keeps ${nz.length} of ${r.num_layers} layers: ${nz.join(", ")}; layers selected in ≥ 80% of bootstrap refits: ${r.lasso.stability.every((v) => !Number.isFinite(v)) ? "not checked (no refits)" : stable.length ? stable.join(", ") : "none"}.`
      : `LASSO (α = ${num(r.lasso.alpha)} by ${r.lasso.folds}-fold CV) keeps no layer: per-layer activation distances do not predict the per-pair gap better than its mean.`;
    const perm = r.lasso.permutation;
    if (perm && nz.length)
      line +=
        perm.p_value < 0.05
          ? ` The fit predicts the gaps better than with them shuffled across pairs (${permutationWords(perm)}).`
          : ` Not supported as a finding: the fit predicts the gaps no better than with them shuffled across pairs (${permutationWords(perm)}; shuffled gaps keep ${num(perm.null_mean_selected)} layers on average).`;
    if (!r.lasso.stable_across_seeds) {
      const other = r.lasso.seed_sets.find((x) => x.nonzero_layers.join() !== nz.join())!;
      line += ` The selection is unstable: it changes with the CV fold seed alone (${set(nz)} at seed ${r.lasso.seed_sets[0]!.seed}, ${set(other.nonzero_layers)} at seed ${other.seed}), so no layer set is a finding.`;
    }
    out.push(line);
  }
  return out;
}

/** The best probe layer of each model. */
function probeFindings(r: Results): string[] {
  const out: string[] = [];
  const above: string[] = [];
  for (const model of ["base", "tuned"] as const) {
    const p = r.probes.filter((x) => x.model === model);
    if (!p.length) continue;
    const best = p.reduce((a, b) => (b.accuracy > a.accuracy ? b : a));
    // chance is 50% (one chosen and one rejected response per pair); one-sided binomial over the 2n responses,
    // Bonferroni over every probe fitted (models × layers)
    const n = 2 * r.n_pairs;
    const m = r.probes.length;
    const pAdj = Math.min(1, m * binomialUpperTail(Math.round(best.accuracy * n), n, 0.5));
    const test = `binomial p = ${pValue(pAdj)} against 50% over ${n} responses, Bonferroni over ${m} probes`;
    if (pAdj < 0.05) above.push(`${model} ${pct(best.accuracy)}`);
    out.push(
      pAdj < 0.05
        ? `Linear probes on the ${model} model separate chosen from rejected responses best at layer ${best.layer}: ${pct(best.accuracy)} cross-validated accuracy, above chance (${test}; difference-of-means direction: ${pct(best.diff_means_accuracy)}).`
        : `Linear probes on the ${model} model: not supported — the best layer (${best.layer}, ${pct(best.accuracy)} cross-validated accuracy) is not distinguishable from chance (${test}).`,
    );
  }
  if (above.length === 2)
    out.push(
      `Both models' activations separate chosen from rejected (best ${above.join(", ")}): the separation is in the responses as either model reads them, so it is no evidence of what the tuning changed.`,
    );
  return out;
}

/** Low-rank sufficiency and steering. */
function lowRankFindings(r: Results): string[] {
  const out: string[] = [];
  if (r.pca && r.pca.explained_variance_ratio.every((v) => !(v > 0)))
    return [
      `Low-rank patching at layer ${r.pca.layer}: not supported — the two models' activations there do not differ on the training pairs, so there is no direction to find.`,
    ];
  if (r.pca && r.pca.recovery.every((x) => Number.isFinite(x.recovery))) {
    const cum: number[] = [];
    r.pca.explained_variance_ratio.reduce((a, v) => (cum.push(a + v), a + v), 0);
    const k90 = cum.findIndex((c) => c >= 0.9) + 1;
    const first = r.pca.recovery.find((x) => x.recovery >= 0.9 && x.k < r.hidden_size);
    out.push(
      `Low-rank patching at layer ${r.pca.layer} (${r.pca.chosen_by}): ${k90} principal direction${k90 === 1 ? " explains" : "s explain"} 90% of the activation difference; ` +
        (first
          ? `patching only the top ${first.k} recover${first.k === 1 ? "s" : ""} ${pct(first.recovery)} of the held-out gap, vs ${pct(first.random_subspace)} for a random ${first.k}-dimensional subspace${lowRankTest(r, first)}.`
          : `none of the subspace sizes tried below the full width (k = ${tried(r)}) recovers 90% of the held-out gap (k = 1: ${pct(r.pca.recovery[0]!.recovery)}, k = ${r.pca.recovery[r.pca.recovery.length - 2]?.k ?? 1}: ${pct(r.pca.recovery[r.pca.recovery.length - 2]?.recovery ?? NaN)}; the full width ${r.hidden_size}: ${pct(r.pca.recovery[r.pca.recovery.length - 1]!.recovery)}).`),
    );
    const [md, , rnd] = r.pca.steering;
    if (md && rnd) {
      const at = (v: typeof md, b: number) => v.by_strength.find((x) => x.strength === b) ?? v.by_strength[0]!;
      const top = md.by_strength.reduce((a, b) => (b.recovery > a.recovery ? b : a));
      const t = steeringVsRandom(r, top.strength);
      const test = !t
        ? r.pca.test_pairs.length < MIN_PAIRS
          ? ` With ${r.pca.test_pairs.length} held-out pairs (fewer than ${MIN_PAIRS}) the two are not tested against each other.`
          : ""
        : t.beats
          ? ` At β = ${top.strength} it beats the random direction (difference ${t.words}).`
          : ` At β = ${top.strength} it is not distinguishable from the random direction (difference ${t.words}): steering with it is not shown to be preference-specific.`;
      out.push(
        `Steering the base model alone (no tuned model at inference) by adding the training pairs' mean difference at layer ${r.pca.layer} recovers ${pct(at(md, 1).recovery)} of the held-out gap at β = 1 and at most ${pct(top.recovery)} (β = ${top.strength}); a random direction of the same norm: ${pct(at(rnd, 1).recovery)} at β = 1 and ${pct(at(rnd, top.strength).recovery)} at β = ${top.strength}.${test}`,
      );
    }
  }
  return out;
}

/** The low-rank line's test against a random subspace, as a clause ("" when the results hold no per-pair gains). */
function lowRankTest(r: Results, at: NonNullable<Results["pca"]>["recovery"][number]): string {
  const t = subspaceVsRandom(r, at);
  if (!t) return "";
  return t.beats
    ? ` (top-k − random ${t.words}: above 0)`
    : ` — not distinguishable from the random subspace (top-k − random ${t.words} includes 0)`;
}

/** Where the logit lens reads half of the final gap. */
function lensFindings(r: Results): string[] {
  const out: string[] = [];
  const lens = r.logit_lens;
  const gaps = lens.tuned.map((t, i) => t - lens.base[i]!);
  const finalGap = gaps[gaps.length - 1]!;
  const emerge = gaps.findIndex((g) => Math.abs(finalGap) > 1e-9 && g / finalGap >= 0.5);
  // a sign change between depths where the gap is at least 5% of the final one (smaller ones are noise around 0)
  const big = gaps.filter((g) => Math.abs(g) >= 0.05 * Math.abs(finalGap));
  const flips = big.slice(1).some((g, i) => Math.sign(g) !== Math.sign(big[i]!));
  const note = flips ? " (the lens gap changes sign across depths, so read it with care)" : "";
  if (emerge === gaps.length - 1)
    out.push(
      `Logit lens: half of the final margin gap is readable only after the last layer: no earlier depth shows it${note}.`,
    );
  else if (emerge >= 0)
    out.push(
      `Logit lens: half of the final margin gap is readable from the residual stream by ${lens.layers[emerge] === "embed" ? "the embedding" : `layer ${lens.layers[emerge]}`}${note}.`,
    );
  return out;
}

/**
 * A per-layer table of the main numbers for the terminal: the recovery of every (site, direction) patched, the
 * first one's CI and controls, LASSO, the probes and the lens; its first line says which series each column is.
 */
export function summaryTable(r: Results): string {
  const f = (x: number | undefined, d = 3) => (x === undefined || Number.isNaN(x) ? "-" : x.toFixed(d));
  const short = (dir: string) => (dir === "tuned->base" ? "t→b" : "b→t");
  const series = [...new Map(r.patching.map((p) => [`${p.site} ${p.direction}`, p])).values()];
  const first = series[0];
  const at = (l: number, s?: { site: string; direction: string }) =>
    s && r.patching.find((x) => x.layer === l && x.site === s.site && x.direction === s.direction);
  const head = ["layer", ...series.map((s) => `${s.site} ${short(s.direction)}`), "95% CI", "random", "mean-abl"];
  head.push("lasso", "probe b", "probe t", "lens gap");
  const rows = [head];
  for (let l = 0; l < r.num_layers; l++) {
    const p = at(l, first);
    rows.push([
      String(l),
      ...series.map((s) => f(at(l, s)?.recovery)),
      p ? `${f(p.recovery_ci[0], 2)}..${f(p.recovery_ci[1], 2)}` : "-",
      f(p?.controls?.random_direction.recovery),
      f(p?.controls?.mean_ablation.recovery),
      f(r.lasso?.coef[l]),
      f(r.probes.find((x) => x.model === "base" && x.layer === l)?.accuracy, 2),
      f(r.probes.find((x) => x.model === "tuned" && x.layer === l)?.accuracy, 2),
      f(r.logit_lens.tuned[l + 1]! - r.logit_lens.base[l + 1]!),
    ]);
  }
  const w = head.map((_, c) => Math.max(...rows.map((row) => row[c]!.length)));
  const what = first
    ? `recovery (mean gain / mean gap) of each site and direction patched; 95% CI, random and mean-abl are ${first.site} ${short(first.direction)}'s`
    : "no patches were run";
  return [`per layer: ${what}`, ...rows.map((row) => row.map((x, c) => x.padStart(w[c]!)).join("  "))].join("\n");
}

/** How far attribution estimates can be trusted here: their agreement with the exact sweep per direction and site. */
function attributionFindings(r: Results): string[] {
  const a = r.attribution;
  if (!a || !a.entries.some((e) => e.exact)) return [];
  const groups = new Map<string, typeof a.entries>();
  for (const e of a.entries)
    groups.set(`${e.site} (${e.direction})`, [...(groups.get(`${e.site} (${e.direction})`) ?? []), e]);
  const agree: string[] = [];
  const out: string[] = [];
  let minAll = Infinity;
  let worst = a.entries[0]!;
  for (const [name, es] of groups) {
    // a correlation is undefined where estimate and exact gain are constant over pairs: both exactly 0 (before a
    // planted change) is agreement, anything else cannot be told
    const rs = es.map((e) =>
      Number.isFinite(e.exact!.correlation) ? e.exact!.correlation : e.exact!.max_abs_error === 0 ? 1 : NaN,
    );
    const minR = rs.some((x) => !Number.isFinite(x)) ? NaN : Math.min(...rs);
    for (const e of es)
      if (Math.abs(e.recovery_estimate - e.exact!.recovery) > Math.abs(worst.recovery_estimate - worst.exact!.recovery))
        worst = e;
    if (minR >= 0.9) {
      agree.push(name);
      minAll = Math.min(minAll, minR);
    } else {
      const at = es[rs.findIndex((x) => !(x >= 0.9))]!;
      out.push(
        Number.isFinite(at.exact!.correlation)
          ? `Attribution patching of ${name} does NOT closely agree with the exact sweep: correlation over pairs ${num(at.exact!.correlation)} at layer ${at.layer}; use the exact numbers there.`
          : `Attribution patching of ${name}: agreement with the exact sweep cannot be told at layer ${at.layer} (the gains are the same for every pair, so their correlation is undefined); use the exact numbers there.`,
      );
    }
  }
  if (agree.length)
    out.unshift(
      `Attribution patching agrees with the exact sweep for ${agree.join(", ")}: correlation over pairs ≥ ${(Math.floor(minAll * 1000) / 1000).toFixed(3)} at every layer.`,
    );
  out.push(
    `The largest gap between estimated and exact recovery is ${worst.site} (${worst.direction}) at layer ${worst.layer}: ${pct(worst.recovery_estimate)} estimated vs ${pct(worst.exact!.recovery)} exact.`,
  );
  return out;
}

/** Sentences about a transfer (apply-subspace): how much of the layer's effect the saved subspace carries here. */
export function transferFindings(r: TransferResult): string[] {
  const all = r.subspace[r.subspace.length - 1]!;
  // the best of the smaller subspaces: all of the saved directions is the largest, so naming it "best" says nothing
  const smaller = r.subspace.filter((x) => x.k < all.k);
  const best = smaller.length ? smaller.reduce((a, b) => (b.recovery > a.recovery ? b : a)) : null;
  const few =
    r.n_pairs < MIN_PAIRS
      ? ` With ${r.n_pairs} pairs (fewer than ${MIN_PAIRS}) these are point estimates: none of them is tested.`
      : "";
  const out = [
    `Over ${r.n_pairs} pairs (mean gap ${num(r.mean_gap)}), patching the whole layer ${r.layer} (resid_post, tuned->base) recovers ${pct(r.full_layer_recovery)} of the gap.${few}`,
    `Patching only the saved subspace's ${all.k} directions recovers ${pct(all.recovery)} (${pct(all.share_of_full_layer)} of the whole layer's effect; a random ${all.k}-dim subspace: ${pct(all.random_subspace)})` +
      (best ? `; of fewer directions, the top ${best.k} recover the most, ${pct(best.recovery)}.` : "."),
  ];
  for (const v of r.steering) {
    const at1 = v.by_strength.find((x) => x.strength === 1) ?? v.by_strength[0]!;
    const top = v.by_strength.reduce((a, b) => (b.recovery > a.recovery ? b : a));
    out.push(
      `Steering the base model alone with the ${v.vector} (norm ${num(v.norm)}) at layer ${r.layer}: ${pct(at1.recovery)} of the gap at β = ${at1.strength}, at most ${pct(top.recovery)} (β = ${top.strength}).`,
    );
  }
  return out;
}
