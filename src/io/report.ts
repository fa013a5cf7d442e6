// report.html: one self-contained file (opens offline) with vega-lite plots rendered to SVG when it is written.
import * as vega from "vega";
import { compile, type TopLevelSpec } from "vega-lite";
import type { Results } from "../analysis/schema.js";
import { betterVerdict } from "../analysis/verdict.js";

/** What the report says in place of the estimators' charts when there is no gap. */
const NOT_DRAWN =
  "Not drawn: the two models' margins differ by no more than float32 rounding (the verdict above), so there is no gap for it to explain.";
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
function chart(
  title: string | { text: string; subtitle?: string },
  values: object[],
  body: object,
  width = W,
  height = H,
): TopLevelSpec {
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v5.json",
    width,
    height,
    title,
    data: { values },
    ...body,
  } as TopLevelSpec;
}

/** The legend of the steering chart's series, for both their color and their dash. */
const VECTOR_LEGEND = { orient: "bottom", direction: "vertical" } as const;

/** A layer of grey horizontal reference lines at the given y values. */
const referenceLines = (ys: number[], dash?: number[]) => ({
  mark: { type: "rule", color: "#888", ...(dash ? { strokeDash: dash } : {}) },
  data: { values: ys.map((y) => ({ y })) },
  encoding: { y: { field: "y", type: "quantitative" } },
});

/** Colors that tell the measures apart in every recovery chart. */
const MEASURES = {
  domain: ["exact patch", "attribution estimate", "random direction"],
  range: ["#1f77b4", "#ff7f0e", "#7f7f7f"],
};

/** The (site, direction) series of the sweep, in the run's order. */
const seriesOf = (r: Results) => [...new Set(r.patching.map((p) => `${p.site} (${p.direction})`))];

/**
 * One small chart per site and direction: the patch's recovery with its CI, the attribution estimate when there
 * is one, and the random-direction control, on one y scale clipped to [-0.5, 1.5] beside the real curve (a
 * clipped point is named in the title). Mean ablation, whose scale is often 10x larger, has its own charts.
 */
function recoverySpecs(r: Results): TopLevelSpec[] {
  const est = new Map(
    (r.attribution?.entries ?? []).map((e) => [`${e.site} (${e.direction}) ${e.layer}`, e.recovery_estimate]),
  );
  return seriesOf(r).map((series) => {
    const ps = r.patching.filter((p) => `${p.site} (${p.direction})` === series);
    const exactKind = ps[0]!.method === "exact" ? "exact patch" : "attribution estimate";
    const rows = ps.flatMap((p) => {
      const out = [
        { layer: p.layer, recovery: p.recovery, lo: p.recovery_ci[0], hi: p.recovery_ci[1], measure: exactKind },
      ];
      const e = est.get(`${series} ${p.layer}`);
      if (e !== undefined && p.method === "exact")
        out.push({ layer: p.layer, recovery: e, lo: NaN, hi: NaN, measure: "attribution estimate" });
      if (p.controls)
        out.push({
          layer: p.layer,
          recovery: p.controls.random_direction.recovery,
          lo: p.controls.random_direction.recovery_ci[0],
          hi: p.controls.random_direction.recovery_ci[1],
          measure: "random direction",
        });
      return out;
    });
    const finite = rows.flatMap((x) => [x.recovery, x.lo, x.hi]).filter(Number.isFinite);
    const lo = Math.max(-0.5, Math.min(-0.1, ...finite));
    const hi = Math.min(1.5, Math.max(1.1, ...finite));
    const clipped = rows.filter((x) => x.recovery < lo || x.recovery > hi);
    const note = clipped.map((x) => `${x.measure} L${x.layer} ${(100 * x.recovery).toFixed(0)}%`).join(", ");
    const enc = {
      x: { field: "layer", type: "ordinal" as const, title: "layer" },
      color: {
        field: "measure",
        type: "nominal" as const,
        title: null,
        scale: MEASURES,
        legend: { orient: "bottom", direction: "vertical" },
      },
    };
    const y = {
      type: "quantitative" as const,
      title: "recovery (mean gain / mean gap)",
      scale: { domain: [lo, hi], clamp: true },
    };
    return chart(
      note ? { text: series, subtitle: `off scale: ${note}` } : series,
      rows,
      {
        layer: [
          {
            mark: { type: "errorbar", ticks: true, clip: true },
            transform: [{ filter: "isFinite(datum.lo)" }],
            encoding: { ...enc, y: { ...y, field: "lo" }, y2: { field: "hi" } },
          },
          { mark: { type: "line", point: true, clip: true }, encoding: { ...enc, y: { ...y, field: "recovery" } } },
          referenceLines([0, 1]),
        ],
      },
      W / 2 - 20,
      H * 0.8,
    );
  });
}

/** The mean-ablation control per site and direction, on its own scale. */
function meanAblationSpecs(r: Results): TopLevelSpec[] {
  return seriesOf(r).flatMap((series) => {
    const ps = r.patching.filter((p) => `${p.site} (${p.direction})` === series && p.controls);
    if (!ps.length) return [];
    const rows = ps.map((p) => ({
      layer: p.layer,
      recovery: p.controls!.mean_ablation.recovery,
      lo: p.controls!.mean_ablation.recovery_ci[0],
      hi: p.controls!.mean_ablation.recovery_ci[1],
    }));
    return [
      chart(
        series,
        rows,
        {
          layer: [
            {
              mark: { type: "errorbar", ticks: true },
              encoding: {
                x: { field: "layer", type: "ordinal" },
                y: { field: "lo", type: "quantitative", title: "recovery" },
                y2: { field: "hi" },
              },
            },
            {
              mark: { type: "line", point: true, color: "#2ca02c" },
              encoding: { x: { field: "layer", type: "ordinal" }, y: { field: "recovery", type: "quantitative" } },
            },
            referenceLines([0, 1]),
          ],
        },
        W / 2 - 60,
        H * 0.5,
      ),
    ];
  });
}

/** Attribution patching: its agreement with the exact sweep per layer, the per-head grid and one pair's token × layer map. */
function attributionSpecs(r: Results): TopLevelSpec[] {
  const a = r.attribution;
  if (!a) return [];
  const out: TopLevelSpec[] = [];
  const agree = a.entries
    .filter((e) => e.exact && Number.isFinite(e.exact.correlation))
    .map((e) => ({ layer: e.layer, correlation: e.exact!.correlation, series: `${e.site} (${e.direction})` }));
  if (agree.length) {
    // many series near r = 1 would draw over each other on [-1, 1]: the y axis starts just below the lowest r,
    // and each layer's series stand side by side
    const low = Math.min(...agree.map((x) => x.correlation));
    const lo = Math.max(-1, low - Math.max(0.01, 0.1 * (1 - low)));
    out.push(
      chart(
        { text: "Attribution vs exact: correlation over pairs per layer", subtitle: `y axis from ${lo.toFixed(3)}` },
        agree,
        {
          layer: [
            {
              mark: { type: "point", filled: true, size: 60 },
              encoding: {
                x: { field: "layer", type: "ordinal" },
                xOffset: { field: "series", type: "nominal" },
                y: { field: "correlation", type: "quantitative", scale: { domain: [lo, 1] }, title: "Pearson r" },
                color: { field: "series", type: "nominal", title: "site (direction)" },
                tooltip: [{ field: "series" }, { field: "layer" }, { field: "correlation", format: ".4f" }],
              },
            },
            referenceLines(
              [0, 0.9].filter((y) => y >= lo),
              [4, 4],
            ),
          ],
        },
        W / 2 + 40,
        H * 0.8,
      ),
    );
  }
  const heads = a.heads.recovery.flatMap((row, layer) => row.map((value, head) => ({ layer, col: head, value })));
  if (heads.length) {
    out.push(
      gridChart(
        `Per-head attribution (attn.hook_z, ${a.heads.direction}): estimated share of the mean gap`,
        heads,
        "head",
        "share of gap",
        Math.min(W, 16 * (a.heads.mean[0]?.length ?? 1)),
        Math.min(H, 16 * a.heads.mean.length),
      ),
    );
  }
  const h = a.heatmap;
  if (h) {
    const label = (row: "chosen" | "rejected", t: number) => {
      const toks = h.tokens?.[row];
      const isPrompt = t < h.ids.prompt.length;
      return `${String(t).padStart(3, "0")} ${isPrompt ? "" : row === "chosen" ? "+" : "−"}${toks?.[t] ?? ""}`;
    };
    for (const row of ["chosen", "rejected"] as const) {
      const cells = h[row].flatMap((vals, li) =>
        vals.map((value, t) => ({ layer: h.layers[li]!, col: label(row, t), value })),
      );
      const line = r.pairs.find((p) => p.index === h.pair)?.line ?? h.pair;
      out.push(
        gridChart(
          `Attribution per token and layer (${h.key}), pair line ${line} (gap ${h.gap.toFixed(2)}), ${row} row`,
          cells,
          "position and token (+/− response; the line marks the first response token)",
          "estimate",
          Math.min(MAP_WIDTH, Math.max(W, 9 * (h[row][0]?.length ?? 0))),
          Math.min(H, 18 * h.layers.length),
          label(row, h.ids.prompt.length),
        ),
      );
    }
  }
  return out;
}

/**
 * Which of a map's columns get an axis label at `width` px: every n-th (about one per 14 px), and always the
 * `boundary` column, whose neighbours within n/2 are left out so that two labels never overlap.
 */
export function labelledColumns<C>(cols: C[], width: number, boundary?: C): { every: number; shown: C[] } {
  const every = Math.max(1, Math.ceil(cols.length / Math.max(1, Math.floor(width / 14))));
  const at = boundary === undefined ? -every : cols.indexOf(boundary);
  return { every, shown: cols.filter((_, i) => i === at || (i % every === 0 && Math.abs(i - at) >= every / 2)) };
}

/** The widest token map, so that its legend still fits beside it on a page. */
const MAP_WIDTH = 960;

/**
 * A layer × column heatmap with a diverging scale centred on 0. With more columns than fit as labels (about
 * one per 14 px), only every n-th column is labelled, and the prompt/response boundary column always is; a
 * `boundary` column gets a vertical line at its left edge.
 */
function gridChart(
  title: string,
  cells: Array<{ layer: number; col: string | number; value: number }>,
  colTitle: string,
  valueTitle: string,
  width: number,
  height: number,
  boundary?: string,
): TopLevelSpec {
  const cols = [...new Set(cells.map((c) => c.col))];
  const { every, shown } = labelledColumns(cols, width, boundary);
  const axis = { labelAngle: -60, labelFontSize: 8, ...(every > 1 ? { values: shown } : {}) };
  const rect = {
    mark: "rect",
    encoding: {
      x: {
        field: "col",
        type: "ordinal",
        title: every > 1 ? `${colTitle}; one in ${every} labelled` : colTitle,
        sort: null,
        axis,
      },
      y: { field: "layer", type: "ordinal" },
      color: {
        field: "value",
        type: "quantitative",
        scale: { scheme: "redblue", domainMid: 0, reverse: true },
        title: valueTitle,
      },
      tooltip: [{ field: "col" }, { field: "layer" }, { field: "value", format: ".4f" }],
    },
  };
  const edge = {
    mark: { type: "rule", color: "#000", strokeWidth: 1.5 },
    encoding: { x: { datum: boundary, type: "ordinal", bandPosition: 0 } },
  };
  return chart(title, cells, boundary === undefined ? rect : { layer: [rect, edge] }, width, height);
}

/** The exact per-head grid and the exact per-position map, when the run made them. */
function fineSpecs(r: Results): TopLevelSpec[] {
  const out: TopLevelSpec[] = [];
  if (r.heads) {
    const cells = r.heads.recovery.flatMap((row, layer) => row.map((value, head) => ({ layer, col: head, value })));
    out.push(
      gridChart(
        `Exact per-head patching (attn.hook_z, ${r.heads.direction}): share of the mean gap`,
        cells,
        "head",
        "share of gap",
        Math.min(W, 16 * (r.heads.recovery[0]?.length ?? 1)),
        Math.min(H, 16 * r.heads.recovery.length),
      ),
    );
  }
  const p = r.position_map;
  if (p) {
    const cells = p.gains.flatMap((row, layer) =>
      row.map((g, t) => ({ layer, col: `${String(t).padStart(3, "0")} ${p.tokens?.[t] ?? ""}`, value: g / p.gap })),
    );
    const line = r.pairs.find((x) => x.index === p.pair)?.line ?? p.pair;
    out.push(
      gridChart(
        `Exact per-position patching (resid_post, ${p.direction}), pair line ${line} (gap ${p.gap.toFixed(2)})`,
        cells,
        "position and token (chosen | rejected where they differ)",
        "share of gap",
        Math.min(MAP_WIDTH, Math.max(W, 9 * (p.gains[0]?.length ?? 0))),
        Math.min(H, 18 * p.gains.length),
      ),
    );
  }
  return out;
}

/** Per-pair distributions: the margin gap, and the exact gain at the first series' best layer. */
function distributionSpecs(r: Results): TopLevelSpec[] {
  const out: TopLevelSpec[] = [
    chart(
      "Per-pair margin gap (tuned − base)",
      r.pairs.map((p) => ({ gap: p.gap })),
      {
        layer: [
          {
            mark: "bar",
            encoding: {
              x: { field: "gap", bin: { maxbins: 30 }, type: "quantitative", title: "gap (nats)" },
              y: { aggregate: "count", type: "quantitative", title: "pairs" },
            },
          },
          {
            mark: { type: "rule", color: "firebrick" },
            data: { values: [{ x: 0 }] },
            encoding: { x: { field: "x", type: "quantitative" } },
          },
        ],
      },
      W / 2 - 20,
      H * 0.7,
    ),
  ];
  const first = r.patching.filter((p) => Number.isFinite(p.recovery));
  if (first.length) {
    const series = `${first[0]!.site} (${first[0]!.direction})`;
    const best = first
      .filter((p) => `${p.site} (${p.direction})` === series)
      .reduce((x, y) => (y.recovery > x.recovery ? y : x));
    out.push(
      chart(
        `Per-pair gain at layer ${best.layer}, ${series} (${best.method})`,
        best.gains.map((g, i) => ({ gain: g, gap: r.pairs[i]!.gap })),
        {
          layer: [
            {
              mark: { type: "point", opacity: 0.6 },
              encoding: {
                x: { field: "gap", type: "quantitative", title: "gap" },
                y: { field: "gain", type: "quantitative", title: "gain" },
              },
            },
            {
              mark: { type: "rule", strokeDash: [4, 4], color: "#888" },
              data: {
                values: [{ x: Math.min(0, ...r.pairs.map((p) => p.gap)), x2: Math.max(...r.pairs.map((p) => p.gap)) }],
              },
              encoding: {
                x: { field: "x", type: "quantitative" },
                y: { field: "x", type: "quantitative" },
                x2: { field: "x2" },
                y2: { field: "x2" },
              },
            },
          ],
        },
        W / 2 - 20,
        H * 0.7,
      ),
    );
  }
  return out;
}

function probeSpec(r: Results): TopLevelSpec | null {
  if (!r.probes.length) return null;
  const rows = r.probes.flatMap((p) => [
    { layer: p.layer, accuracy: p.accuracy, model: p.model, method: "logistic regression" },
    { layer: p.layer, accuracy: p.diff_means_accuracy, model: p.model, method: "difference of means" },
  ]);
  return chart("Probe accuracy (chosen vs rejected, K-fold CV by pair)", rows, {
    layer: [
      {
        mark: { type: "line", point: true },
        encoding: {
          x: { field: "layer", type: "ordinal" },
          y: { field: "accuracy", type: "quantitative", title: "cross-validated accuracy", scale: { domain: [0, 1] } },
          color: { field: "model", type: "nominal" },
          strokeDash: {
            field: "method",
            type: "nominal",
            scale: {
              domain: ["logistic regression", "difference of means"],
              range: [
                [1, 0],
                [6, 3],
              ],
            },
            legend: {
              symbolType: "stroke",
              symbolSize: 400,
              encode: { symbols: { update: { stroke: { value: "#444" }, strokeWidth: { value: 2 } } } },
            },
          },
        },
      },
      referenceLines([0.5], [2, 2]),
    ],
  });
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
        encoding: {
          x: { field: "layer", type: "ordinal" },
          y: { field: "value", type: "quantitative", title: "coefficient" },
        },
      },
      W / 2 - 20,
      H,
    ),
    chart(
      "Stability selection (fraction of refits ≠ 0)",
      coef,
      {
        mark: "bar",
        encoding: {
          x: { field: "layer", type: "ordinal" },
          y: { field: "stability", type: "quantitative", scale: { domain: [0, 1] } },
        },
      },
      W / 2 - 20,
      H,
    ),
    chart(
      "LASSO cross-validation curve (± 1 s.e.)",
      l.path.map((p) => ({
        alpha: p.alpha,
        mse: p.cvMse,
        lo: p.cvMse - p.cvSe,
        hi: p.cvMse + p.cvSe,
        chosen: p.alpha === l.alpha,
      })),
      {
        layer: [
          {
            mark: "errorband",
            encoding: {
              x: { field: "alpha", type: "quantitative", scale: { type: "log" } },
              y: { field: "lo", type: "quantitative", title: "CV mean squared error" },
              y2: { field: "hi" },
            },
          },
          {
            mark: "line",
            encoding: {
              x: { field: "alpha", type: "quantitative", scale: { type: "log" } },
              y: { field: "mse", type: "quantitative" },
            },
          },
          {
            mark: { type: "rule", color: "firebrick" },
            transform: [{ filter: "datum.chosen" }],
            encoding: { x: { field: "alpha", type: "quantitative" } },
          },
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
  // the spectrum up to the component where 90% is explained (at least 8, at most 128 bars)
  let upTo = p.explained_variance_ratio.length;
  for (let i = 0, c = 0; i < p.explained_variance_ratio.length; i++)
    if ((c += p.explained_variance_ratio[i]!) >= 0.9) ((upTo = i + 1), (i = Infinity));
  const spec = p.explained_variance_ratio
    .slice(0, Math.min(128, Math.max(8, upTo)))
    .map((v, i) => ((cum += v), { component: i + 1, ratio: v, cumulative: cum }));
  const rec = p.recovery.flatMap((x) => [
    { k: x.k, recovery: x.recovery, subspace: "top-k principal directions" },
    { k: x.k, recovery: x.random_subspace, subspace: "random k-dim subspace" },
  ]);
  return [
    chart(
      `PCA spectrum of h_tuned − h_base, layer ${p.layer} (90% at ${upTo} components)`,
      spec,
      {
        layer: [
          {
            mark: "bar",
            encoding: {
              x: { field: "component", type: "ordinal" },
              y: { field: "ratio", type: "quantitative", title: "explained variance ratio", scale: { domain: [0, 1] } },
            },
          },
          {
            mark: { type: "line", color: "firebrick", point: true },
            encoding: { x: { field: "component", type: "ordinal" }, y: { field: "cumulative", type: "quantitative" } },
          },
        ],
      },
      Math.max(W / 2 - 20, 10 * spec.length),
      H,
    ),
    chart(
      "Held-out recovery vs k",
      rec,
      {
        layer: [
          {
            mark: { type: "line", point: true },
            encoding: {
              x: { field: "k", type: "quantitative", scale: { type: "log", base: 2 } },
              y: { field: "recovery", type: "quantitative", title: "held-out recovery" },
              color: { field: "subspace", type: "nominal" },
            },
          },
          referenceLines([0, 1]),
        ],
      },
      W / 2 - 20,
      H,
    ),
    ...(p.steering.length
      ? [
          chart(
            `Steering the base model alone at layer ${p.layer} (held-out)`,
            p.steering.flatMap((v) =>
              v.by_strength.map((b) => ({ strength: b.strength, recovery: b.recovery, vector: v.vector })),
            ),
            {
              layer: [
                {
                  // series that coincide (the mean difference and its top-k projection when k spans it) stay
                  // visible: each has its own dash and point shape, drawn translucent
                  mark: { type: "line", point: { filled: false, size: 60 }, opacity: 0.8 },
                  encoding: {
                    x: {
                      field: "strength",
                      type: "quantitative",
                      title: "β (h + β·v)",
                      scale: { type: "log", base: 2 },
                    },
                    y: { field: "recovery", type: "quantitative", title: "recovery" },
                    // color and dash share one legend (vega-lite merges the legends of one field, and warned
                    // when one of the two was hidden); the points' shapes would be a second legend of the same
                    // names, so theirs is hidden
                    color: { field: "vector", type: "nominal", title: null, legend: VECTOR_LEGEND },
                    strokeDash: { field: "vector", type: "nominal", title: null, legend: VECTOR_LEGEND },
                    shape: { field: "vector", type: "nominal", legend: null },
                  },
                },
                referenceLines([0, 1]),
              ],
            },
            W / 2 - 20,
            H,
          ),
        ]
      : []),
  ];
}

function lensSpec(r: Results): TopLevelSpec {
  const rows = r.logit_lens.layers.flatMap((layer, i) => [
    { layer, order: i, margin: r.logit_lens.base[i], model: "base" },
    { layer, order: i, margin: r.logit_lens.tuned[i], model: "tuned" },
  ]);
  return chart("Logit lens: mean margin read from each layer's residual stream", rows, {
    mark: { type: "line", point: true },
    encoding: {
      x: { field: "layer", type: "ordinal", sort: { field: "order" } },
      y: { field: "margin", type: "quantitative", title: "mean margin (nats)" },
      color: { field: "model", type: "nominal" },
    },
  });
}

/** The findings' verdict lines begin so (analysis/verdict.ts). */
const VERDICT = "Verdict — ";

/** The verdict lines as the report's first block: each question, then its answer with the evidence. */
function verdictBlock(findings: string[]): string {
  const lines = findings.filter((f) => f.startsWith(VERDICT));
  if (!lines.length) return "";
  const items = lines.map((l) => {
    const [question, ...answer] = l.slice(VERDICT.length).split("? ");
    const q = question!.charAt(0).toUpperCase() + question!.slice(1);
    return `<dt>${escapeHtml(q)}?</dt><dd>${escapeHtml(answer.join("? "))}</dd>`;
  });
  return `<h2>Verdict</h2>\n<dl class="verdict">${items.join("\n")}</dl>`;
}

/** Renders the whole report. `meta` rows are shown as a settings table; pairs give example texts. */
export async function renderReport(
  r: Results,
  findings: string[],
  meta: Record<string, string>,
  pairs: Pair[],
): Promise<string> {
  // with no gap (identical models or responses) the estimators' charts would draw fits to rounding alone
  const noGap = r.pairs.length > 0 && betterVerdict(r.pairs).answer === "no gap";
  const sections: Array<[string, TopLevelSpec[], string?]> = [
    [
      "Layer-wide causal patching",
      recoverySpecs(r),
      "Recovery = mean gain / mean gap per patched layer, one chart per site and direction, with 95% bootstrap CIs. The y axis, in fractions of the gap, is clipped to [−0.5, 1.5] (−50% to 150%); a value off that scale is named under the chart's title. Mean ablation, often on a 10x larger scale, is charted on its own below.",
    ],
    [
      "Controls: mean ablation",
      meanAblationSpecs(r),
      "The site replaced by its dataset mean over the destination model (own y scale per chart).",
    ],
    [
      "Attribution patching",
      attributionSpecs(r),
      "First-order estimates α (h_tuned − h_base) · ∂margin/∂h from one backward pass per model; beside exact patches, their correlation over pairs per layer. The token × layer maps are for the pair with the largest |gap| (red raises the margin toward the tuned model's).",
    ],
    [
      "Heads and positions (exact patches)",
      fineSpecs(r),
      "Each attention head's attn.hook_z, or each token position's resid_post, patched on its own (the first direction).",
    ],
    ["Per-pair distributions", distributionSpecs(r)],
    ["Linear probes", [probeSpec(r)].filter((x): x is TopLevelSpec => x !== null)],
    ["LASSO: which layers' activation distances predict the per-pair gap", noGap ? [] : lassoSpecs(r)],
    ["Low-rank reconstruction", noGap ? [] : pcaSpecs(r)],
    ["Logit lens", [lensSpec(r)]],
  ];
  let body = "";
  for (const [title, specs, note] of sections) {
    if (!specs.length && noGap && (title.startsWith("LASSO") || title.startsWith("Low-rank"))) {
      body += `<h2>${escapeHtml(title)}</h2>\n<p class="note">${escapeHtml(NOT_DRAWN)}</p>\n`;
      continue;
    }
    if (!specs.length) continue;
    body += `<h2>${escapeHtml(title)}</h2>\n${note ? `<p class="note">${escapeHtml(note)}</p>\n` : ""}<div class="plots">`;
    for (const s of specs) body += `<figure>${await svg(s)}</figure>`;
    body += "</div>\n";
  }
  const top = [...r.pairs].sort((a, b) => b.gap - a.gap).slice(0, 5);
  const lowest = [...r.pairs].sort((a, b) => a.gap - b.gap).slice(0, 5);
  const negative = r.pairs.filter((p) => p.gap < 0).length;
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
td.t{white-space:pre-wrap;max-width:28em;overflow-wrap:anywhere}li{margin:.4em 0}p.note{color:#555;font-size:.9em;max-width:60em}
td.wide{max-width:60em}.verdict{border:2px solid #444;border-radius:6px;padding:.4em 1em;background:#f6f6f0}.verdict dt{font-weight:600;margin-top:.5em}.verdict dd{margin:.1em 0 .3em 0}
</style></head><body>
<h1>prefprobe: where does preference tuning live?</h1>
${verdictBlock(findings)}
<h2>Findings</h2>
<ul>${findings
    .filter((f) => !f.startsWith(VERDICT))
    .map((f) => `<li>${escapeHtml(f)}</li>`)
    .join("\n")}</ul>
${body}
<h2>Pairs with the largest margin gap</h2>
<table><tr><th>line</th><th>gap</th><th>prompt</th><th>chosen</th><th>rejected</th></tr>
${top.map(example).join("\n")}
</table>
<h2>Pairs with the lowest margin gap</h2>
<p>${negative} of ${r.n_pairs} pairs have a negative gap (the tuned model prefers the chosen response less than the base does).</p>
<table><tr><th>line</th><th>gap</th><th>prompt</th><th>chosen</th><th>rejected</th></tr>
${lowest.map(example).join("\n")}
</table>
<h2>Run</h2>
<table>${Object.entries(meta)
    .map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td class="t wide">${escapeHtml(v)}</td></tr>`)
    .join("\n")}</table>
</body></html>
`;
}
