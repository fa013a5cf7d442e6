// report.html: one self-contained file (opens offline) with vega-lite plots rendered to SVG when it is written.
import * as vega from "vega";
import { compile, type TopLevelSpec } from "vega-lite";
import type { Results } from "../analysis/settings.js";
import type { Pair } from "../data/pairs.js";

/** Escapes text for HTML element content and attribute values. */
export function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!);
}

async function svg(spec: TopLevelSpec): Promise<string> {
  const withConfig = { ...spec, config: { legend: { labelLimit: 400 }, axis: { labelLimit: 300 } } } as TopLevelSpec;
  const view = new vega.View(vega.parse(compile(withConfig).spec), { renderer: "none" });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

const W = 520;
const H = 260;

/** A vega-lite chart of `values` with a title and size; `body` holds its mark and encoding, or its layers. */
function chart(title: string, values: object[], body: object, width = W, height = H): TopLevelSpec {
  return { $schema: "https://vega.github.io/schema/vega-lite/v5.json", width, height, title, data: { values }, ...body } as TopLevelSpec;
}

/** A layer of grey horizontal reference lines at the given y values. */
const referenceLines = (ys: number[], dash?: number[]) => ({
  mark: { type: "rule", color: "#888", ...(dash ? { strokeDash: dash } : {}) },
  data: { values: ys.map((y) => ({ y })) },
  encoding: { y: { field: "y", type: "quantitative" } },
});

function recoverySpec(r: Results): TopLevelSpec | null {
  const rows = r.patching.flatMap((p) => {
    const series = `${p.site} (${p.direction})`;
    const out = [{ layer: p.layer, recovery: p.recovery, lo: p.recovery_ci[0], hi: p.recovery_ci[1], series, kind: "patch" }];
    if (p.controls) {
      out.push({ layer: p.layer, recovery: p.controls.random_direction.recovery, lo: p.controls.random_direction.recovery_ci[0], hi: p.controls.random_direction.recovery_ci[1], series, kind: "random direction" });
      out.push({ layer: p.layer, recovery: p.controls.mean_ablation.recovery, lo: p.controls.mean_ablation.recovery_ci[0], hi: p.controls.mean_ablation.recovery_ci[1], series, kind: "mean ablation" });
    }
    return out;
  });
  if (!rows.length) return null;
  const enc = {
    x: { field: "layer", type: "ordinal" as const, title: "layer" },
    color: { field: "kind", type: "nominal" as const, title: "patch", sort: ["patch", "random direction", "mean ablation"] },
    strokeDash: { field: "series", type: "nominal" as const, title: "site (direction)" },
  };
  return chart(
    "Recovery of the margin gap by patched layer (95% bootstrap CI)",
    rows,
    {
      layer: [
        { mark: { type: "errorbar", ticks: true }, encoding: { ...enc, y: { field: "lo", type: "quantitative", title: "recovery (mean gain / mean gap)" }, y2: { field: "hi" } } },
        { mark: { type: "line", point: true }, encoding: { ...enc, y: { field: "recovery", type: "quantitative", title: "recovery (mean gain / mean gap)" } } },
        referenceLines([0, 1]),
      ],
    },
  );
}

function probeSpec(r: Results): TopLevelSpec | null {
  if (!r.probes.length) return null;
  const rows = r.probes.flatMap((p) => [
    { layer: p.layer, accuracy: p.accuracy, model: p.model, method: "logistic regression" },
    { layer: p.layer, accuracy: p.diff_means_accuracy, model: p.model, method: "difference of means" },
  ]);
  return chart(
    "Probe accuracy (chosen vs rejected, K-fold CV by pair)",
    rows,
    {
      layer: [
        {
          mark: { type: "line", point: true },
          encoding: {
            x: { field: "layer", type: "ordinal" },
            y: { field: "accuracy", type: "quantitative", title: "cross-validated accuracy", scale: { domain: [0, 1] } },
            color: { field: "model", type: "nominal" },
            strokeDash: { field: "method", type: "nominal" },
          },
        },
        referenceLines([0.5], [2, 2]),
      ],
    },
  );
}

function lassoSpecs(r: Results): TopLevelSpec[] {
  if (!r.lasso) return [];
  const l = r.lasso;
  const coef = l.coef.map((c, layer) => ({ layer, value: c, stability: l.stability[layer] }));
  return [
    chart(
      `LASSO coefficients (standardized), α = ${l.alpha.toPrecision(3)}`,
      coef,
      {
        mark: "bar",
        encoding: { x: { field: "layer", type: "ordinal" }, y: { field: "value", type: "quantitative", title: "coefficient" } },
      },
      W / 2 - 20,
      H,
    ),
    chart(
      "Stability selection (fraction of refits ≠ 0)",
      coef,
      {
        mark: "bar",
        encoding: { x: { field: "layer", type: "ordinal" }, y: { field: "stability", type: "quantitative", scale: { domain: [0, 1] } } },
      },
      W / 2 - 20,
      H,
    ),
    chart(
      "LASSO cross-validation curve (± 1 s.e.)",
      l.path.map((p) => ({ alpha: p.alpha, mse: p.cvMse, lo: p.cvMse - p.cvSe, hi: p.cvMse + p.cvSe, chosen: p.alpha === l.alpha })),
      {
        layer: [
          { mark: "errorband", encoding: { x: { field: "alpha", type: "quantitative", scale: { type: "log" } }, y: { field: "lo", type: "quantitative", title: "CV mean squared error" }, y2: { field: "hi" } } },
          { mark: "line", encoding: { x: { field: "alpha", type: "quantitative", scale: { type: "log" } }, y: { field: "mse", type: "quantitative" } } },
          { mark: { type: "rule", color: "firebrick" }, transform: [{ filter: "datum.chosen" }], encoding: { x: { field: "alpha", type: "quantitative" } } },
        ],
      },
      W,
      H * 0.7,
    ),
  ];
}

function pcaSpecs(r: Results): TopLevelSpec[] {
  if (!r.pca) return [];
  const p = r.pca;
  let cum = 0;
  const spec = p.explained_variance_ratio.slice(0, 16).map((v, i) => ((cum += v), { component: i + 1, ratio: v, cumulative: cum }));
  const rec = p.recovery.flatMap((x) => [
    { k: x.k, recovery: x.recovery, subspace: "top-k principal directions" },
    { k: x.k, recovery: x.random_subspace, subspace: "random k-dim subspace" },
  ]);
  return [
    chart(
      `PCA spectrum of h_tuned − h_base, layer ${p.layer}`,
      spec,
      {
        layer: [
          { mark: "bar", encoding: { x: { field: "component", type: "ordinal" }, y: { field: "ratio", type: "quantitative", title: "explained variance ratio", scale: { domain: [0, 1] } } } },
          { mark: { type: "line", color: "firebrick", point: true }, encoding: { x: { field: "component", type: "ordinal" }, y: { field: "cumulative", type: "quantitative" } } },
        ],
      },
      W / 2 - 20,
      H,
    ),
    chart(
      "Held-out recovery vs k",
      rec,
      {
        layer: [
          { mark: { type: "line", point: true }, encoding: { x: { field: "k", type: "quantitative", scale: { type: "log", base: 2 } }, y: { field: "recovery", type: "quantitative", title: "held-out recovery" }, color: { field: "subspace", type: "nominal" } } },
          referenceLines([0, 1]),
        ],
      },
      W / 2 - 20,
      H,
    ),
  ];
}

function lensSpec(r: Results): TopLevelSpec {
  const rows = r.logit_lens.layers.flatMap((layer, i) => [
    { layer, order: i, margin: r.logit_lens.base[i], model: "base" },
    { layer, order: i, margin: r.logit_lens.tuned[i], model: "tuned" },
  ]);
  return chart(
    "Logit lens: mean margin read from each layer's residual stream",
    rows,
    {
      mark: { type: "line", point: true },
      encoding: {
        x: { field: "layer", type: "ordinal", sort: { field: "order" } },
        y: { field: "margin", type: "quantitative", title: "mean margin (nats)" },
        color: { field: "model", type: "nominal" },
    },
    },
  );
}

/** Renders the whole report. `meta` rows are shown as a settings table; pairs give example texts. */
export async function renderReport(r: Results, findings: string[], meta: Record<string, string>, pairs: Pair[]): Promise<string> {
  const sections: Array<[string, TopLevelSpec[]]> = [
    ["Layer-wide causal patching", [recoverySpec(r)].filter((x): x is TopLevelSpec => x !== null)],
    ["Linear probes", [probeSpec(r)].filter((x): x is TopLevelSpec => x !== null)],
    ["LASSO: which layers' activation distances predict the per-pair gap", lassoSpecs(r)],
    ["Low-rank reconstruction", pcaSpecs(r)],
    ["Logit lens", [lensSpec(r)]],
  ];
  let body = "";
  for (const [title, specs] of sections) {
    if (!specs.length) continue;
    body += `<h2>${escapeHtml(title)}</h2>\n<div class="plots">`;
    for (const s of specs) body += `<figure>${await svg(s)}</figure>`;
    body += "</div>\n";
  }
  const top = [...r.pairs].sort((a, b) => b.gap - a.gap).slice(0, 5);
  const byIndex = new Map(pairs.map((p) => [p.index, p]));
  const example = (rec: (typeof r.pairs)[number]) => {
    const p = byIndex.get(rec.index);
    const text = (s: string | undefined, ids: number[] | undefined) => escapeHtml(s ?? `[${ids?.join(", ") ?? ""}]`);
    return `<tr><td>${rec.line}</td><td>${rec.gap.toFixed(3)}</td><td class="t">${text(p?.prompt, p?.promptIds)}</td><td class="t">${text(p?.chosen, p?.chosenIds)}</td><td class="t">${text(p?.rejected, p?.rejectedIds)}</td></tr>`;
  };
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>prefprobe report</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
.plots{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:.3em .5em;vertical-align:top}
td.t{white-space:pre-wrap;max-width:28em;overflow-wrap:anywhere}li{margin:.4em 0}
</style></head><body>
<h1>prefprobe: where does preference tuning live?</h1>
<h2>Findings</h2>
<ul>${findings.map((f) => `<li>${escapeHtml(f)}</li>`).join("\n")}</ul>
${body}
<h2>Pairs with the largest margin gap</h2>
<table><tr><th>line</th><th>gap</th><th>prompt</th><th>chosen</th><th>rejected</th></tr>
${top.map(example).join("\n")}
</table>
<h2>Run</h2>
<table>${Object.entries(meta)
    .map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(v)}</td></tr>`)
    .join("\n")}</table>
</body></html>
`;
}
