// A naive float64 Llama forward pass in plain TypeScript: loops over numbers, no tfjs, no shared code with
// src/model. It reads weights in Hugging Face layout ([out, in], row-major) and follows the HF modeling code's
// definitions directly. Slow on purpose: it exists only to be obviously right.

export interface OracleConfig {
  hidden: number;
  inter: number;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  vocab: number;
  eps: number;
  theta: number;
  rope:
    | { kind: "default" }
    | { kind: "linear"; factor: number }
    | { kind: "llama3"; factor: number; low: number; high: number; orig: number };
  tied: boolean;
  attnBias: boolean;
  mlpBias: boolean;
}

export type Weights = Record<string, Float64Array>;

export interface OracleOutput {
  logits: number[][]; // [T][V]
  /**
   * Every per-position hook site as [T][width]: embed, resid_pre/mid/post, attn_out, mlp_out ([T][H]); attn q,
   * rot_q, z ([T][heads·d], head-major) and k, rot_k, v ([T][kvHeads·d]); mlp pre, pre_linear, post ([T][I]).
   */
  sites: Record<string, number[][]>;
  /** attn.hook_attn_scores and attn.hook_pattern as [heads][Tq][Tk]; a masked score (key after query) is −Infinity. */
  matrices: Record<string, number[][][]>;
}

function matVec(w: Float64Array, rows: number, cols: number, x: number[], bias?: Float64Array): number[] {
  const y: number[] = [];
  for (let r = 0; r < rows; r++) {
    let acc = bias ? bias[r]! : 0;
    for (let c = 0; c < cols; c++) acc += w[r * cols + c]! * x[c]!;
    y.push(acc);
  }
  return y;
}

function rmsnorm(x: number[], w: Float64Array, eps: number): number[] {
  let ss = 0;
  for (const v of x) ss += v * v;
  const scale = 1 / Math.sqrt(ss / x.length + eps);
  return x.map((v, i) => v * scale * w[i]!);
}

/** Frequencies per rotary pair, following the HF definitions of each rope type. */
export function oracleFrequencies(cfg: OracleConfig): number[] {
  const freqs: number[] = [];
  for (let i = 0; i < cfg.headDim; i += 2) {
    let f = Math.pow(cfg.theta, -i / cfg.headDim);
    const r = cfg.rope;
    if (r.kind === "linear") f = f / r.factor;
    if (r.kind === "llama3") {
      const wl = (2 * Math.PI) / f;
      const lowWl = r.orig / r.low;
      const highWl = r.orig / r.high;
      if (wl > lowWl) f = f / r.factor;
      else if (wl >= highWl) {
        const s = (r.orig / wl - r.low) / (r.high - r.low);
        f = (1 - s) * (f / r.factor) + s * f;
      }
    }
    freqs.push(f);
  }
  return freqs;
}

/** Rotates one head vector at position t: pairs (j, j + d/2), HF's rotate_half convention. */
function rotate(v: number[], t: number, freqs: number[]): number[] {
  const half = v.length / 2;
  const out = v.slice();
  for (let j = 0; j < half; j++) {
    const a = t * freqs[j]!;
    const c = Math.cos(a);
    const s = Math.sin(a);
    out[j] = v[j]! * c - v[j + half]! * s;
    out[j + half] = v[j + half]! * c + v[j]! * s;
  }
  return out;
}

/** Runs one unpadded sequence. */
export function oracleForward(cfg: OracleConfig, w: Weights, ids: number[]): OracleOutput {
  const H = cfg.hidden;
  const d = cfg.headDim;
  const T = ids.length;
  const freqs = oracleFrequencies(cfg);
  const sites: Record<string, number[][]> = {};
  const matrices: Record<string, number[][][]> = {};
  const emb = w["model.embed_tokens.weight"]!;
  let x: number[][] = ids.map((id) => Array.from(emb.subarray(id * H, (id + 1) * H)));
  sites["hook_embed"] = x;
  for (let l = 0; l < cfg.layers; l++) {
    const p = (n: string) => w[`model.layers.${l}.${n}`]!;
    const pb = (n: string) => (w[`model.layers.${l}.${n}`] as Float64Array | undefined) ?? undefined;
    sites[`blocks.${l}.hook_resid_pre`] = x;
    const xn = x.map((row) => rmsnorm(row, p("input_layernorm.weight"), cfg.eps));
    const Q = xn.map((row) =>
      matVec(
        p("self_attn.q_proj.weight"),
        cfg.heads * d,
        H,
        row,
        cfg.attnBias ? pb("self_attn.q_proj.bias") : undefined,
      ),
    );
    const K = xn.map((row) =>
      matVec(
        p("self_attn.k_proj.weight"),
        cfg.kvHeads * d,
        H,
        row,
        cfg.attnBias ? pb("self_attn.k_proj.bias") : undefined,
      ),
    );
    const V = xn.map((row) =>
      matVec(
        p("self_attn.v_proj.weight"),
        cfg.kvHeads * d,
        H,
        row,
        cfg.attnBias ? pb("self_attn.v_proj.bias") : undefined,
      ),
    );
    // every head of a row rotated at its own position
    const rotRows = (X: number[][], n: number) =>
      X.map((row, t) => Array.from({ length: n }, (_, h) => rotate(row.slice(h * d, h * d + d), t, freqs)).flat());
    const [rQ, rK] = [rotRows(Q, cfg.heads), rotRows(K, cfg.kvHeads)];
    Object.assign(sites, {
      [`blocks.${l}.attn.hook_q`]: Q,
      [`blocks.${l}.attn.hook_k`]: K,
      [`blocks.${l}.attn.hook_v`]: V,
      [`blocks.${l}.attn.hook_rot_q`]: rQ,
      [`blocks.${l}.attn.hook_rot_k`]: rK,
    });
    const perKv = cfg.heads / cfg.kvHeads;
    const z: number[][] = Array.from({ length: T }, () => new Array(cfg.heads * d).fill(0));
    const scoreRows: number[][][] = [];
    const patternRows: number[][][] = [];
    for (let h = 0; h < cfg.heads; h++) {
      const kvh = Math.floor(h / perKv);
      scoreRows.push([]);
      patternRows.push([]);
      for (let t = 0; t < T; t++) {
        const q = rQ[t]!.slice(h * d, h * d + d);
        const scores: number[] = [];
        for (let s = 0; s <= t; s++) {
          const k = rK[s]!.slice(kvh * d, kvh * d + d);
          let dot = 0;
          for (let j = 0; j < d; j++) dot += q[j]! * k[j]!;
          scores.push(dot / Math.sqrt(d));
        }
        const m = Math.max(...scores);
        const e = scores.map((v) => Math.exp(v - m));
        const sum = e.reduce((a, b) => a + b, 0);
        for (let s = 0; s <= t; s++)
          for (let j = 0; j < d; j++) z[t]![h * d + j]! += (e[s]! / sum) * V[s]![kvh * d + j]!;
        const later = T - t - 1; // keys after the query: masked
        scoreRows[h]!.push([...scores, ...new Array<number>(later).fill(-Infinity)]);
        patternRows[h]!.push([...e.map((v) => v / sum), ...new Array<number>(later).fill(0)]);
      }
    }
    sites[`blocks.${l}.attn.hook_z`] = z;
    matrices[`blocks.${l}.attn.hook_attn_scores`] = scoreRows;
    matrices[`blocks.${l}.attn.hook_pattern`] = patternRows;
    const attnOut = z.map((row) =>
      matVec(
        p("self_attn.o_proj.weight"),
        H,
        cfg.heads * d,
        row,
        cfg.attnBias ? pb("self_attn.o_proj.bias") : undefined,
      ),
    );
    sites[`blocks.${l}.hook_attn_out`] = attnOut;
    const mid = x.map((row, t) => row.map((v, i) => v + attnOut[t]![i]!));
    sites[`blocks.${l}.hook_resid_mid`] = mid;
    const mn = mid.map((row) => rmsnorm(row, p("post_attention_layernorm.weight"), cfg.eps));
    const gate = mn.map((row) =>
      matVec(p("mlp.gate_proj.weight"), cfg.inter, H, row, cfg.mlpBias ? pb("mlp.gate_proj.bias") : undefined),
    );
    const up = mn.map((row) =>
      matVec(p("mlp.up_proj.weight"), cfg.inter, H, row, cfg.mlpBias ? pb("mlp.up_proj.bias") : undefined),
    );
    const act = gate.map((g, t) => g.map((gv, i) => (gv / (1 + Math.exp(-gv))) * up[t]![i]!)); // SiLU(gate) · up
    sites[`blocks.${l}.mlp.hook_pre`] = gate;
    sites[`blocks.${l}.mlp.hook_pre_linear`] = up;
    sites[`blocks.${l}.mlp.hook_post`] = act;
    const mlpOut = act.map((row) =>
      matVec(p("mlp.down_proj.weight"), H, cfg.inter, row, cfg.mlpBias ? pb("mlp.down_proj.bias") : undefined),
    );
    sites[`blocks.${l}.hook_mlp_out`] = mlpOut;
    x = mid.map((row, t) => row.map((v, i) => v + mlpOut[t]![i]!));
    sites[`blocks.${l}.hook_resid_post`] = x;
  }
  const fn = x.map((row) => rmsnorm(row, w["model.norm.weight"]!, cfg.eps));
  const head = cfg.tied ? emb : w["lm_head.weight"]!;
  const logits = fn.map((row) => matVec(head, cfg.vocab, H, row));
  return { logits, sites, matrices };
}
