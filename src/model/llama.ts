// The Llama forward pass, by hand on tfjs-core ops. Read it top to bottom:
//   embed → for each layer: x + attention(rmsnorm(x)), then + mlp(rmsnorm(x)) → final rmsnorm → head.
// Every intermediate that matters passes through `site(name, value)`, which can cache it or replace it; an
// unwatched site costs nothing. Site names and shapes follow TransformerLens (model/hooks.ts lists them).
import * as tf from "@tensorflow/tfjs-core";
import type { LlamaConfig } from "./config.js";
import type { TextTokenizer } from "./text.js";
import { ActivationCache, hookName, isHookName, type HookName, type LayerSite } from "./hooks.js";
import { takeBackendFault } from "./backend.js";
import { nativeMatMulActive, rowLogSumExp, StoredMatrix, storedMatMul } from "./native.js";
import { packPairs, type Packing } from "./packing.js";
import { ropeTables } from "./rope.js";

/**
 * A weight matrix: a tensor [in, out] on the backend (transposed from Hugging Face's [out, in], so that every
 * projection is a plain x·W: tfjs's wasm matmul is ~10x slower with a transposed operand), or a streamed
 * model's StoredMatrix, [out, in] in its stored bytes outside the backend, which the native matmul reads in place.
 */
export type Matrix = tf.Tensor2D | StoredMatrix;

/**
 * One decoder layer's weights; a resident model's matrices are all tensors (LlamaLayer<tf.Tensor2D>). Shapes in
 * the [in, out] layout with H = hidden, I = intermediate, nH/nKv = query/key-value heads, d = head_dim.
 */
export interface LlamaLayer<M extends Matrix = Matrix> {
  inputNorm: tf.Tensor1D; // [H]: RMSNorm weight before attention
  q: M; // [H, nH*d]
  k: M; // [H, nKv*d]
  v: M; // [H, nKv*d]
  o: M; // [nH*d, H]
  qBias?: tf.Tensor1D; // [nH*d] (config attention_bias; off in Llama 3)
  kBias?: tf.Tensor1D; // [nKv*d]
  vBias?: tf.Tensor1D; // [nKv*d]
  oBias?: tf.Tensor1D; // [H]
  postNorm: tf.Tensor1D; // [H]: RMSNorm weight before the MLP
  gate: M; // [H, I]
  up: M; // [H, I]
  down: M; // [I, H]
  gateBias?: tf.Tensor1D; // [I] (mlp_bias)
  upBias?: tf.Tensor1D; // [I]
  downBias?: tf.Tensor1D; // [H]
}

/** A loaded model: config plus weights kept per layer (so one layer can be moved in or out at a time). */
export interface LlamaModel {
  config: LlamaConfig;
  embed: tf.Tensor2D; // [vocab, hidden]; empty ([0, hidden]) when streamed: rows come from `source`
  layers: LlamaLayer<tf.Tensor2D>[]; // empty when streamed: layers come from `source`
  finalNorm: tf.Tensor1D; // [hidden]
  lmHead: tf.Tensor2D; // [hidden, vocab]: the embedding transposed when tied; empty when a streamed head comes in chunks
  /** Where a streamed model's layers and embedding rows come from (io/stream.ts); absent when all resident. */
  source?: WeightSource;
  /** The folder's tokenizer (tokenizer.json), read on first use by a loaded model; null when it has none. */
  readonly tokenizer?: TextTokenizer | null;
}

/** Weights kept outside the backend and brought in on demand. */
export interface WeightSource {
  /** Layer l on the backend; valid until the source is asked for another layer. */
  layer(l: number): LlamaLayer;
  /** Embedding rows of the ids → [ids.length, hidden]. */
  embedRows(ids: number[]): tf.Tensor2D;
  /** When set, the head is not resident (`lmHead` is empty) but comes in this many vocabulary chunks. */
  headChunks?: number;
  /** Head chunk c: [hidden, chunk vocab] (a StoredMatrix [chunk vocab, hidden]), chunks in vocabulary order; valid until the next request. */
  headChunk?(c: number): Matrix;
  /** Frees whatever the source holds on the backend. */
  dispose(): void;
}

/** Layer l's weights, resident or brought in from the model's source. */
const layerOf = (model: LlamaModel, l: number): LlamaLayer => (model.source ? model.source.layer(l) : model.layers[l]!);

/** Token embeddings [B, T, H] of ids [B][T]. */
function embedTokens(model: LlamaModel, ids: number[][]): tf.Tensor {
  const [B, T] = [ids.length, ids[0]!.length];
  if (model.source) return tf.reshape(model.source.embedRows(ids.flat()), [B, T, model.config.hiddenSize]);
  return tf.gather(model.embed, tf.tensor2d(ids, [B, T], "int32"));
}

/** A hook sees a site's value and returns the value to use instead (return the input to only observe). */
export type Hook = (value: tf.Tensor, site: HookName) => tf.Tensor;

/**
 * Hooks by site name (hookName(site, layer)): a literal key that is not a hook name does not compile; a
 * computed one that is not a site of the model is an error at run time.
 */
export type Hooks = { readonly [K in HookName]?: Hook };

/** What one forward call should do besides computing logits. */
export interface ForwardOptions {
  /** True length of each row; rows are right-padded to the common length. Default: all full. */
  lengths?: number[];
  /** Sites to cache: a list of names, or a predicate. Cached tensors belong to the caller (see ForwardResult). */
  cache?: Iterable<HookName | string> | ((site: HookName) => boolean);
  /**
   * Per-site hooks that edit or replace the value (patching), keyed by hook name (hookName(site, layer)). A
   * name that is not a site of the model is an error. A hook's intermediates are freed by the pass.
   */
  hooks?: Hooks;
  /**
   * Rows 2i and 2i+1 are pair i's chosen and rejected sequences, sharing their first pairedPrompts[i] tokens:
   * each pair runs as one packed row so its prompt is computed once (model/packing.ts). Hooks, caches, `start`
   * and logit positions still use the [B, T] rows; a hook must treat both rows' prompt alike. A pass that
   * watches any attn.hook_attn_scores or attn.hook_pattern runs the rows apart instead: a packed row's
   * attention matrix is both rows' at once.
   */
  pairedPrompts?: number[];
  /** Start at `blocks.{layer}.hook_resid_pre` with this residual [B, T, H], skipping the layers before. */
  start?: { layer: number; resid: tf.Tensor };
  /** Last layer to run (inclusive). Stopping before the last layer skips the final norm and the head. */
  stopAfter?: number;
  /** Which logits: "all" → [B, T, V] (default), "none", or [batch, position] pairs → [N, V]. */
  logitsAt?: "all" | "none" | Array<[number, number]>;
  /**
   * With logitsAt as positions: the token to score at each. The result then holds `logprobs` (log p(target),
   * float64) instead of logits, computed one vocabulary block at a time so no [N, V] tensor is ever made.
   */
  targets?: number[];
  /**
   * How attention multiplies: "grouped" (one 2-D matmul per row and kv head, fast on wasm at long T),
   * "batched", or "auto" (default: groupedAttention's choice for the kernel that runs). A layer whose
   * attn_scores or pattern is watched runs batched: those sites are whole [B, heads, T, T] tensors.
   */
  attention?: "auto" | "grouped" | "batched";
  /** How `targets` go through the vocabulary (HEAD_BLOCK by default; its size changes the float32 rounding). */
  headBlock?: HeadBlock;
}

/** Score-matrix entries (query heads per group × T × T) from which "auto" attention goes grouped. */
export const GROUPED_ATTENTION_MIN = 16384;

/**
 * Score entries of one row (heads × T × T) from which "auto" attention goes grouped on the native matmul, which
 * runs batched products as fast as 2-D ones (1B width, T = 222: 2.7-3.1 s a 16-layer forward batched, 3.5-4.3
 * grouped): only to keep every head's scores of a long row from being held at once (8 MiB a row at this size).
 */
export const NATIVE_GROUPED_MIN = 2 ** 21;

/** Whether forward's "auto" attention runs rows of length T one (row, kv head) at a time, on the kernel that runs now. */
export const groupedAttention = (cfg: LlamaConfig, T: number): boolean =>
  nativeMatMulActive()
    ? cfg.numHeads * T * T >= NATIVE_GROUPED_MIN
    : (cfg.numHeads / cfg.numKvHeads) * T * T >= GROUPED_ATTENTION_MIN;

/** Logits (null when not asked for or stopped early) and the cached sites; the caller owns both. */
export interface ForwardResult {
  logits: tf.Tensor | null;
  /** log p(target) at each logitsAt position, when `targets` was given (else null). */
  logprobs: Float64Array | null;
  cache: ActivationCache;
  /** Frees the logits and every cached tensor. */
  dispose(): void;
}

/** Per-call context shared by the block functions. */
interface Ctx {
  cfg: LlamaConfig;
  site: (name: HookName, value: tf.Tensor) => tf.Tensor;
  watched: (name: HookName) => boolean; // a hook or the cache wants this site
  cos: tf.Tensor; // [T, head_dim], or [rows, 1, T, head_dim] per packed row
  sin: tf.Tensor;
  maskBias: tf.Tensor; // [B, 1, 1, T, T]: 0 where a query may attend to a key, −1e9 elsewhere
  grouped: boolean; // attention by one 2-D matmul per (row, kv head) instead of batched matmuls
  rows: RowMap;
}

/** The rows a forward runs vs the caller's [B, T] rows: the same, or pairs packed (pairedPrompts). */
interface RowMap {
  shape: [number, number]; // the caller's B, T
  /** The run's flat row index of the caller's flat entry b·T + t. */
  slot(i: number): number;
  /** A run tensor [rows, T', ...] as the caller's [B, T, ...], and back. */
  unpack(x: tf.Tensor): tf.Tensor;
  pack(x: tf.Tensor): tf.Tensor;
  /** Throws when a hook gave a pair's two rows different prompt values (packing would drop the rejected row's). */
  checkPrompts(x: tf.Tensor, site: string): void;
  dispose(): void;
}

/** The identity RowMap. */
function sameRows(B: number, T: number): RowMap {
  return { shape: [B, T], slot: (i) => i, unpack: (x) => x, pack: (x) => x, checkPrompts: () => {}, dispose: () => {} };
}

/** The RowMap of packed pairs. */
function packedRows(p: Packing, B: number, T: number): RowMap {
  const [toSlots, toEntries] = [tf.tensor1d(p.unpack, "int32"), tf.tensor1d(p.pack, "int32")];
  const [chosen, rejected] = [
    tf.tensor1d(
      Array.from(p.promptSlots, (s) => p.pack[s]!),
      "int32",
    ),
    tf.tensor1d(p.rejectedPrompt, "int32"),
  ];
  const move = (x: tf.Tensor, idx: tf.Tensor, from: number, to: [number, number]) => {
    const rest = x.shape.slice(2);
    return tf.reshape(tf.gather(tf.reshape(x, [from, ...rest]), idx), [...to, ...rest]);
  };
  return {
    shape: [B, T],
    slot: (i) => p.unpack[i]!,
    unpack: (x) => move(x, toSlots, p.rows * p.T, [B, T]),
    pack: (x) => move(x, toEntries, B * T, [p.rows, p.T]),
    checkPrompts: (x, site) => {
      const [diff, scale] = tf.tidy(() => {
        const flat = tf.reshape(x, [B * T, -1]);
        const a = tf.gather(flat, chosen);
        return [tf.max(tf.abs(tf.sub(a, tf.gather(flat, rejected)))), tf.max(tf.abs(a))];
      });
      const [d, m] = [diff!.dataSync()[0]!, scale!.dataSync()[0]!];
      tf.dispose([diff!, scale!]);
      if (!(d <= 1e-5 * Math.max(1, m)))
        throw new Error(
          `${site} gives a pair's chosen and rejected rows different prompt values (by ${d}), which pairedPrompts cannot run`,
        );
    },
    dispose: () => tf.dispose([toSlots, toEntries, chosen, rejected]),
  };
}

/** x · W (+ b) for x [..., in] and W [in, out] (a StoredMatrix [out, in] is read transposed where it lies). */
function linear(x: tf.Tensor, w: Matrix, b?: tf.Tensor1D): tf.Tensor {
  if (w instanceof StoredMatrix) return b ? tf.add(storedMatMul(x, w), b) : storedMatMul(x, w);
  const lead = x.shape.slice(0, -1);
  const y = tf.matMul(tf.reshape(x, [-1, w.shape[0]]), w);
  return tf.reshape(b ? tf.add(y, b) : y, [...lead, w.shape[1]]);
}

/** RMSNorm: x / sqrt(mean(x²) + eps) · w, over the last axis. */
function rmsNorm(x: tf.Tensor, w: tf.Tensor1D, eps: number): tf.Tensor {
  return tf.mul(tf.mul(x, tf.rsqrt(tf.add(tf.mean(tf.square(x), -1, true), eps))), w);
}

/** RoPE in the half-rotation layout: x·cos + rotate_half(x)·sin, x [B, heads, T, head_dim]. */
function rope(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor): tf.Tensor {
  const half = x.shape[3]! / 2;
  const [x1, x2] = tf.split(x, [half, half], 3);
  const rotated = tf.concat([tf.neg(x2!), x1!], 3);
  return tf.add(tf.mul(x, cos), tf.mul(rotated, sin));
}

/** Whether layer l's attention scores or pattern is watched (each a [B, heads, T, T] tensor). */
const watchesMatrices = (watched: (name: HookName) => boolean, l: number): boolean =>
  watched(hookName("attn_scores", l)) || watched(hookName("pattern", l));

/** Grouped-query causal self-attention; consecutive query heads share one kv head. Returns [B, T, H]. */
function attention(p: LlamaLayer, x: tf.Tensor, l: number, ctx: Ctx): tf.Tensor {
  const { numHeads: nH, numKvHeads: nKv, headDim: d } = ctx.cfg;
  const [B, T] = x.shape as [number, number, number];
  // the sites see [B, T, heads, d] (TransformerLens's layout); attention runs on [B, heads, T, d]
  const heads = (w: Matrix, b: tf.Tensor1D | undefined, n: number, s: LayerSite) =>
    tf.transpose(ctx.site(hookName(s, l), tf.reshape(linear(x, w, b), [B, T, n, d])), [0, 2, 1, 3]);
  const rotary = (y: tf.Tensor, s: LayerSite) => {
    const r = rope(y, ctx.cos, ctx.sin);
    if (!ctx.watched(hookName(s, l))) return r;
    return tf.transpose(ctx.site(hookName(s, l), tf.transpose(r, [0, 2, 1, 3])), [0, 2, 1, 3]);
  };
  const [q0, k0, v] = [heads(p.q, p.qBias, nH, "q"), heads(p.k, p.kBias, nKv, "k"), heads(p.v, p.vBias, nKv, "v")];
  const q = rotary(q0, "rot_q"); // [B, nH, T, d]
  const k = rotary(k0, "rot_k"); // [B, nKv, T, d]
  // Query heads kv·g … kv·g+g−1 read kv head kv: view q as [B, nKv, g·T, d] and attend per kv head. A watched
  // score or pattern is every head's matrix at once, which only the batched form holds.
  const grouped = ctx.grouped && !watchesMatrices(ctx.watched, l);
  const z = grouped ? attendPerGroup(q, k, v, ctx) : attendBatched(q, k, v, l, ctx);
  const zHooked = ctx.site(`blocks.${l}.attn.hook_z`, tf.transpose(tf.reshape(z, [B, nH, T, d]), [0, 2, 1, 3])); // [B, T, heads, head_dim]
  return linear(tf.reshape(zHooked, [B, T, nH * d]), p.o, p.oBias);
}

/**
 * softmax(q kᵀ/√d + mask) v for all (row, kv head) at once with batched matmuls → [B, nKv, g·T, d]; the masked
 * scores and their softmax pass the attn_scores and pattern sites.
 */
function attendBatched(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, l: number, ctx: Ctx): tf.Tensor {
  const [B, nKv, T, d] = k.shape as [number, number, number, number];
  const g = q.shape[1]! / nKv;
  const scores = tf.mul(tf.matMul(tf.reshape(q, [B, nKv, g * T, d]), tf.transpose(k, [0, 1, 3, 2])), 1 / Math.sqrt(d));
  const masked = matrixSite(
    `blocks.${l}.attn.hook_attn_scores`,
    tf.add(tf.reshape(scores, [B, nKv, g, T, T]), ctx.maskBias),
    ctx,
  );
  const probs = matrixSite(`blocks.${l}.attn.hook_pattern`, tf.softmax(masked, -1), ctx);
  return tf.matMul(tf.reshape(probs, [B, nKv, g * T, T]), v);
}

/** A site of attention matrices [B, nKv, g, T, T], seen as [B, heads, Tq, Tk] (head kv·g + i is [kv, i]). */
function matrixSite(name: HookName, x: tf.Tensor, ctx: Ctx): tf.Tensor {
  if (!ctx.watched(name)) return x;
  const [B, nKv, g, T] = x.shape as [number, number, number, number, number];
  return tf.reshape(ctx.site(name, tf.reshape(x, [B, nKv * g, T, T])), [B, nKv, g, T, T]);
}

/**
 * The same as attendBatched with one 2-D matmul per (row, kv head): tfjs-wasm runs 2-D matmuls through XNNPACK
 * but batched ones through a scalar loop, which dominates at long T.
 */
function attendPerGroup(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, ctx: Ctx): tf.Tensor {
  const [B, nKv, T, d] = k.shape as [number, number, number, number];
  const g = q.shape[1]! / nKv;
  const qs = tf.unstack(tf.reshape(q, [B * nKv, g * T, d]));
  const kTs = tf.unstack(tf.reshape(tf.transpose(k, [0, 1, 3, 2]), [B * nKv, d, T])); // kᵀ once: no transposed matmul operand
  const vs = tf.unstack(tf.reshape(v, [B * nKv, T, d]));
  const masks = tf.unstack(tf.reshape(ctx.maskBias, [B, 1, T, T]));
  const zs = qs.map((qi, i) =>
    tf.tidy(() => {
      const scores = tf.reshape(tf.mul(tf.matMul(qi, kTs[i]!), 1 / Math.sqrt(d)), [g, T, T]);
      const probs = tf.softmax(tf.add(scores, masks[Math.floor(i / nKv)]!), -1);
      return tf.matMul(tf.reshape(probs, [g * T, T]), vs[i]!);
    }),
  );
  return tf.reshape(tf.stack(zs), [B, nKv, g * T, d]);
}

/** SwiGLU MLP: down(silu(gate(x)) · up(x)); each [.., intermediate] product is freed once used. */
function mlp(p: LlamaLayer, x: tf.Tensor, l: number, ctx: Ctx): tf.Tensor {
  const silu = (g: tf.Tensor) => tf.mul(g, tf.sigmoid(g));
  const h = tf.tidy(() =>
    tf.mul(
      tf.tidy(() => silu(ctx.site(`blocks.${l}.mlp.hook_pre`, linear(x, p.gate, p.gateBias)))),
      ctx.site(`blocks.${l}.mlp.hook_pre_linear`, linear(x, p.up, p.upBias)),
    ),
  );
  return linear(ctx.site(`blocks.${l}.mlp.hook_post`, h), p.down, p.downBias); // h [B, T, I]: the neurons
}

/** One decoder layer, pre-norm residual: returns the residual stream after the layer. */
function block(p: LlamaLayer, l: number, resid: tf.Tensor, ctx: Ctx): tf.Tensor {
  const eps = ctx.cfg.rmsNormEps;
  const x = ctx.site(`blocks.${l}.hook_resid_pre`, resid);
  // attention's and the MLP's intermediates are freed as each ends (tidy), so a layer holds the larger, not both
  const attnOut = ctx.site(
    `blocks.${l}.hook_attn_out`,
    tf.tidy(() => attention(p, rmsNorm(x, p.inputNorm, eps), l, ctx)),
  );
  const mid = ctx.site(`blocks.${l}.hook_resid_mid`, tf.add(x, attnOut));
  const mlpOut = ctx.site(
    `blocks.${l}.hook_mlp_out`,
    tf.tidy(() => mlp(p, rmsNorm(mid, p.postNorm, eps), l, ctx)),
  );
  return ctx.site(`blocks.${l}.hook_resid_post`, tf.add(mid, mlpOut));
}

/**
 * Final norm and unembedding, at all positions ([B, T, V]) or at chosen ones ([N, V]); `unembedded` false stops
 * at the normed rows. ctx.rows maps the run's rows to the caller's [B, T] (packed pairs).
 */
function head(
  model: LlamaModel,
  resid: tf.Tensor,
  ctx: Ctx,
  at: "all" | Array<[number, number]>,
  unembedded = true,
): tf.Tensor {
  const H = resid.shape[2]!;
  const norm = (x: tf.Tensor) => rmsNorm(x, model.finalNorm, ctx.cfg.rmsNormEps);
  if (at === "all") return unembed(model, ctx.rows.unpack(ctx.site("ln_final.hook_normalized", norm(resid))));
  const [B, T] = ctx.rows.shape;
  for (const [b, t] of at)
    if (!(b >= 0 && b < B && t >= 0 && t < T)) throw new RangeError(`logit position [${b}, ${t}] outside [${B}, ${T}]`);
  const index = tf.tensor1d(
    at.map(([b, t]) => ctx.rows.slot(b * T + t)),
    "int32",
  );
  // the norm is per position: unless the site is watched, only the scored positions are gathered and normed
  const watched = ctx.watched("ln_final.hook_normalized");
  const rows = watched
    ? tf.gather(tf.reshape(ctx.site("ln_final.hook_normalized", norm(resid)), [-1, H]), index)
    : norm(tf.gather(tf.reshape(resid, [-1, H]), index));
  return unembedded ? unembed(model, rows) : rows;
}

/**
 * How the scored log-softmax (`targets`) goes through the vocabulary. `size`: each block of this many columns has
 * its log-sum-exp taken in float32 on the backend and the blocks are combined in float64; fixed, so how a
 * streamed head is chunked cannot change a bit. `elements`: logit entries a slice of rows holds at once; more
 * rows go through each piece of the head in slices, so a streamed head is brought in once per forward however
 * many rows it scores.
 */
export interface HeadBlock {
  size: number;
  elements: number;
}

/** The default: blocks of 8192 columns, 16 MiB of float32 logits per slice (a block's log-sum-exp makes about 3x that). */
export const HEAD_BLOCK: Readonly<HeadBlock> = Object.freeze({ size: 8192, elements: 2 ** 22 });

/** The head's weights piece by piece ([H, vocab slice]): the whole head when resident, else each streamed chunk. */
function headPieces(model: LlamaModel): Array<() => Matrix> {
  const src = model.source;
  if (!src?.headChunks) return [() => model.lmHead];
  return Array.from({ length: src.headChunks }, (_, c) => () => src.headChunk!(c));
}

/** log p(targets[i]) under the head at each row of x [N, H] (final-normed), one vocabulary block at a time. */
function targetLogprobs(model: LlamaModel, x: tf.Tensor2D, targets: number[], headBlock: HeadBlock): Float64Array {
  const N = x.shape[0];
  if (targets.length !== N) throw new RangeError(`targets has ${targets.length} entries for ${N} logit positions`);
  const V = model.config.vocabSize;
  for (const t of targets) {
    if (!Number.isInteger(t))
      throw new RangeError(
        `targets must be one integer token id per logitsAt position, got ${Array.isArray(t) ? "an array" : String(t)}`,
      );
    if (t < 0 || t >= V) throw new RangeError(`target id ${t} outside the vocabulary [0, ${V})`);
  }
  const pieces = headPieces(model);
  const n = Math.max(1, Math.floor(headBlock.elements / (Math.ceil(V / pieces.length) + headBlock.size))); // rows per slice
  const lse: Float32Array[] = []; // per block: log Σ exp(logits) over the block, per row
  const picked = new Float64Array(N);
  // each slice of rows carries the logits of vocabulary [from, from + width) it has not yet reduced
  const slices = Array.from({ length: Math.ceil(N / n) }, (_, i) => ({
    start: i * n,
    x: N <= n ? x : tf.slice(x, [i * n, 0], [Math.min(n, N - i * n), -1]),
    held: null as tf.Tensor2D | null,
  }));
  let from = 0;
  const reduce = (block: tf.Tensor2D, a: number, start: number, bi: number) => {
    const [rows, w] = block.shape;
    const hits = Array.from({ length: rows }, (_, i) => i).filter(
      (i) => targets[start + i]! >= a && targets[start + i]! < a + w,
    );
    const [l, p] = tf.tidy(() => [
      rowLogSumExp(block),
      hits.length
        ? tf.gather(
            tf.reshape(block, [-1]),
            tf.tensor1d(
              hits.map((i) => i * w + targets[start + i]! - a),
              "int32",
            ),
          )
        : tf.zeros([0]),
    ]);
    (lse[bi] ??= new Float32Array(N)).set(l!.dataSync(), start);
    const pv = p!.dataSync();
    hits.forEach((i, k) => (picked[start + i] = pv[k]!));
    tf.dispose([l!, p!]);
  };
  try {
    for (const piece of pieces) {
      const b0 = lse.length;
      let advanced = 0;
      for (const sl of slices) {
        const next = tf.tidy(() => linear(sl.x, piece()) as tf.Tensor2D);
        const cur: tf.Tensor2D = sl.held ? tf.concat([sl.held, next], 1) : next;
        if (sl.held) tf.dispose([sl.held, next]);
        sl.held = cur;
        const [rows, width] = cur.shape;
        const last = from + width === V;
        let off = 0;
        for (let bi = b0; width - off >= headBlock.size || (last && off < width); bi++) {
          const w = Math.min(headBlock.size, width - off);
          const block = off === 0 && w === width ? cur : tf.slice(cur, [0, off], [rows, w]);
          reduce(block, from + off, sl.start, bi);
          if (block !== cur) block.dispose();
          off += w;
        }
        if (off > 0) {
          sl.held = off < width ? tf.slice(cur, [0, off], [rows, width - off]) : null;
          cur.dispose();
        }
        advanced = off;
      }
      from += advanced;
    }
  } finally {
    for (const sl of slices) {
      sl.held?.dispose();
      if (sl.x !== x) sl.x.dispose();
    }
  }
  return Float64Array.from(picked, (v, i) => {
    let m = -Infinity;
    for (const b of lse) m = Math.max(m, b[i]!);
    let sum = 0;
    for (const b of lse) sum += Math.exp(b[i]! - m);
    return v - (m + Math.log(sum));
  });
}

/** The final norm at positions `at` of a residual [B, T, H] (unpacked rows) → [N, H]: the head's input at scored positions. */
export function normedRows(model: LlamaModel, resid: tf.Tensor, at: Array<[number, number]>): tf.Tensor2D {
  const [, T, H] = resid.shape as [number, number, number];
  return tf.tidy(() =>
    rmsNorm(
      tf.gather(
        tf.reshape(resid, [-1, H]),
        tf.tensor1d(
          at.map(([b, t]) => b * T + t),
          "int32",
        ),
      ),
      model.finalNorm,
      model.config.rmsNormEps,
    ),
  ) as tf.Tensor2D;
}

/** d · Wᵀ for d [N, out] and a head piece W (a tensor [in, out], or a StoredMatrix [out, in]) → [N, in]. */
const linearT = (d: tf.Tensor, w: Matrix): tf.Tensor =>
  w instanceof StoredMatrix ? storedMatMul(d, w, true) : tf.matMul(d, w, false, true);

/**
 * ∂(Σᵢ wᵢ log p(targetᵢ))/∂x at final-normed rows x [N, H], without autodiff and without a [N, V] tensor:
 * wᵢ (W[:, tᵢ] − Σ_v softmax(x W)ᵢᵥ W[:, v]), the softmax taken over the head's pieces in vocabulary blocks with
 * a running max (rescaling what is summed so far when the max grows).
 */
export function targetLogprobGradient(
  model: LlamaModel,
  x: tf.Tensor2D,
  targets: number[],
  weights: number[],
  headBlock: HeadBlock = HEAD_BLOCK,
): tf.Tensor2D {
  const [N, H] = x.shape;
  if (targets.length !== N || weights.length !== N)
    throw new RangeError(`targets and weights need ${N} entries, one per row`);
  const V = model.config.vocabSize;
  for (const t of targets)
    if (!(Number.isInteger(t) && t >= 0 && t < V))
      throw new RangeError(`target id ${t} outside the vocabulary [0, ${V})`);
  let m = tf.fill([N, 1], -Infinity) as tf.Tensor2D; // running max of the logits
  let s = tf.zeros([N, 1]) as tf.Tensor2D; // Σ exp(logit − m)
  let A = tf.zeros([N, H]) as tf.Tensor2D; // Σ exp(logit − m) W[:, v]
  let B = tf.zeros([N, H]) as tf.Tensor2D; // W[:, target]
  let from = 0;
  const block = (logits: tf.Tensor2D, w: Matrix, a: number) => {
    const width = logits.shape[1];
    const next = tf.tidy(() => {
      const mNew = tf.maximum(m, tf.max(logits, 1, true));
      const scale = tf.exp(tf.sub(m, mNew));
      const e = tf.exp(tf.sub(logits, mNew));
      const onehot = new Float32Array(N * width);
      targets.forEach((t, i) => t >= a && t < a + width && (onehot[i * width + t - a] = 1));
      const both = linearT(tf.concat([e, tf.tensor2d(onehot, [N, width])]), w); // one product for both sums
      const [ea, oa] = tf.split(both, 2);
      return [
        mNew,
        tf.add(tf.mul(s, scale), tf.sum(e, 1, true)),
        tf.add(tf.mul(A, scale), ea!),
        tf.add(B, oa!),
      ] as tf.Tensor2D[];
    });
    tf.dispose([m, s, A, B]);
    [m, s, A, B] = next as [tf.Tensor2D, tf.Tensor2D, tf.Tensor2D, tf.Tensor2D];
  };
  try {
    for (const piece of headPieces(model)) {
      const w = piece();
      const width = w instanceof StoredMatrix ? w.rows : w.shape[1];
      // a wide resident piece goes a block of columns at a time
      for (let c = 0; c < width; c += headBlock.size) {
        const cw = Math.min(headBlock.size, width - c);
        const sub = w instanceof StoredMatrix || cw === width ? w : (tf.slice(w, [0, c], [-1, cw]) as tf.Tensor2D);
        const logits = tf.tidy(() => linear(x, sub) as tf.Tensor2D);
        block(logits, sub, from + c);
        logits.dispose();
        if (sub !== w) (sub as tf.Tensor).dispose();
        if (w instanceof StoredMatrix) break; // a stored piece is one chunk of the head, taken whole
      }
      from += width;
    }
    return tf.tidy(() => tf.mul(tf.sub(B, tf.div(A, s)), tf.tensor2d(weights, [N, 1]))) as tf.Tensor2D;
  } finally {
    tf.dispose([m, s, A, B]);
  }
}

/** x · lmHead, with a streamed head one vocabulary chunk at a time. */
function unembed(model: LlamaModel, x: tf.Tensor): tf.Tensor {
  const src = model.source;
  if (!src?.headChunks) return linear(x, model.lmHead);
  return tf.concat(
    Array.from({ length: src.headChunks }, (_, c) => linear(x, src.headChunk!(c))),
    -1,
  );
}

/** Additive attention mask [B, 1, 1, T, T]: causal, and keys past a row's length are hidden. */
function maskBias(lengths: number[], T: number): tf.Tensor {
  const m = new Float32Array(lengths.length * T * T);
  lengths.forEach((len, b) => {
    for (let q = 0; q < T; q++) for (let k = 0; k < T; k++) if (k > q || k >= len) m[(b * T + q) * T + k] = -1e9;
  });
  return tf.tensor(m, [lengths.length, 1, 1, T, T]);
}

/** Hook and cache names must be sites this model has: a typo must not silently patch nothing. */
function checkSiteNames(names: Iterable<string>, numLayers: number): void {
  for (const n of names) {
    const layer = /^blocks\.(\d+)\./.exec(n)?.[1];
    if (!isHookName(n) || (layer !== undefined && Number(layer) >= numLayers))
      throw new RangeError(`unknown hook site "${n}" (see hookNames(config))`);
  }
}

/**
 * Runs the model on right-padded token ids [B][T]. Optionally caches or replaces any hook site, starts from a
 * given residual at a layer, stops after a layer, and computes logits only where asked.
 */
export function forward(model: LlamaModel, ids: number[][], opts: ForwardOptions = {}): ForwardResult {
  const cfg = model.config;
  const B = ids.length;
  const T = ids[0]?.length ?? 0;
  if (B === 0 || T === 0) throw new RangeError("forward needs at least one row of at least one token");
  if (ids.some((r) => r.length !== T)) throw new RangeError("all rows of ids must have the same (padded) length");
  for (const r of ids)
    for (const id of r)
      if (!(Number.isInteger(id) && id >= 0 && id < cfg.vocabSize))
        throw new RangeError(`token id ${id} outside the vocabulary [0, ${cfg.vocabSize})`);
  const lengths = opts.lengths ?? ids.map(() => T);
  if (lengths.length !== B || lengths.some((n) => !(Number.isInteger(n) && n >= 1 && n <= T)))
    throw new RangeError("lengths must give 1..T for each row");
  if (opts.start && !tf.util.arraysEqual(opts.start.resid.shape, [B, T, cfg.hiddenSize])) {
    throw new RangeError(`start residual has shape [${opts.start.resid.shape}], expected [${[B, T, cfg.hiddenSize]}]`);
  }
  const first = opts.start?.layer ?? 0;
  const last = opts.stopAfter ?? cfg.numLayers - 1;
  if (first < 0 || first > cfg.numLayers || last < first - 1 || last >= cfg.numLayers)
    throw new RangeError(`layer range ${first}..${last} is outside 0..${cfg.numLayers - 1}`);

  checkSiteNames(
    [...Object.keys(opts.hooks ?? {}), ...(opts.cache && typeof opts.cache !== "function" ? opts.cache : [])],
    cfg.numLayers,
  );
  const cached = new ActivationCache();
  const wanted: (n: HookName) => boolean =
    opts.cache === undefined
      ? () => false
      : typeof opts.cache === "function"
        ? opts.cache
        : (
            (s) => (n: string) =>
              s.has(n)
          )(new Set<string>(opts.cache));
  const watched = (name: HookName) => !!opts.hooks?.[name] || wanted(name);
  // a packed row's attention matrix is both rows' at once, not the [B, T] view a hook sees: run them apart
  const matrices = Array.from({ length: cfg.numLayers }, (_, l) => watchesMatrices(watched, l)).some((w) => w);
  const paired = opts.pairedPrompts ? packPairs(ids, lengths, opts.pairedPrompts) : null; // checked either way
  const packing = matrices ? null : paired;
  const rows = packing ? packedRows(packing, B, T) : sameRows(B, T);
  const site = (name: HookName, value: tf.Tensor): tf.Tensor => {
    if (!watched(name)) return value;
    const hook = opts.hooks?.[name];
    const mine = rows.unpack(value); // the caller's [B, T, ...] view
    let v = mine;
    if (hook) {
      v = hook(mine, name);
      if (!tf.util.arraysEqual(v.shape, mine.shape))
        throw new Error(`hook for ${name} returned shape [${v.shape}], expected [${mine.shape}]`);
    }
    if (wanted(name)) cached.set(name, tf.keep(tf.clone(v)));
    if (!hook) return value;
    rows.checkPrompts(v, `the hook at ${name}`);
    return rows.pack(v);
  };
  const Tr = packing?.T ?? T; // the length of the rows the layers run
  const tables = ropeTables(cfg, T);
  const ropeTable = (t: Float32Array) =>
    tf.tidy(() => {
      const table = tf.tensor2d(t, [T, cfg.headDim]);
      return packing
        ? tf.reshape(tf.gather(table, tf.tensor1d(packing.positions, "int32")), [packing.rows, 1, Tr, cfg.headDim])
        : table;
    });
  const ctx: Ctx = {
    cfg,
    site,
    watched,
    cos: ropeTable(tables.cos),
    sin: ropeTable(tables.sin),
    maskBias: packing ? tf.tensor(packing.mask, [packing.rows, 1, 1, Tr, Tr]) : maskBias(lengths, T),
    grouped: opts.attention === "grouped" || ((opts.attention ?? "auto") === "auto" && groupedAttention(cfg, Tr)),
    rows,
  };
  try {
    if (opts.start) rows.checkPrompts(opts.start.resid, `the start residual of layer ${opts.start.layer}`);
    let resid = opts.start
      ? tf.tidy(() => tf.clone(rows.pack(opts.start!.resid)))
      : tf.tidy(() => tf.clone(site("hook_embed", embedTokens(model, packing?.ids ?? ids))));
    for (let l = first; l <= last; l++) {
      const prev = resid;
      try {
        resid = tf.tidy(() => tf.clone(block(layerOf(model, l), l, prev, ctx)));
      } finally {
        prev.dispose(); // on a failing hook too
      }
    }
    const at = opts.logitsAt ?? "all";
    if (opts.targets && !Array.isArray(at)) throw new RangeError("targets need logitsAt positions");
    const headRun = last === cfg.numLayers - 1 && at !== "none";
    let logits: tf.Tensor | null = null;
    let logprobs: Float64Array | null = null;
    if (headRun && opts.targets) {
      const rows = tf.tidy(() => head(model, resid, ctx, at, false)) as tf.Tensor2D;
      try {
        logprobs = targetLogprobs(model, rows, opts.targets, opts.headBlock ?? HEAD_BLOCK);
      } finally {
        rows.dispose();
      }
    } else if (headRun) logits = tf.tidy(() => head(model, resid, ctx, at));
    resid.dispose();
    const fault = takeBackendFault();
    if (fault) {
      logits?.dispose();
      throw new Error(
        `the backend failed during a forward pass, so its numbers cannot be trusted (${fault}); on wasm this is its 4 GiB heap running out: a smaller memoryBudget or batchPairs needs less`,
      );
    }
    return { logits, logprobs, cache: cached, dispose: () => (logits?.dispose(), cached.dispose()) };
  } catch (e) {
    cached.dispose();
    throw e;
  } finally {
    ctx.cos.dispose();
    ctx.sin.dispose();
    ctx.maskBias.dispose();
    rows.dispose();
  }
}

/** Frees every weight of a model (and what its source holds). */
export function disposeModel(model: LlamaModel): void {
  model.source?.dispose();
  const seen = new Set<tf.Tensor>();
  const free = (t: tf.Tensor | undefined) => {
    if (t && !seen.has(t)) {
      seen.add(t);
      t.dispose();
    }
  };
  free(model.embed);
  free(model.lmHead);
  free(model.finalNorm);
  for (const p of model.layers) for (const t of Object.values(p)) free(t as tf.Tensor);
}
