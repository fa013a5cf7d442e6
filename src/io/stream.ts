// A streamed model's weights: kept in Node memory in their file dtype (BF16 takes half of float32), brought
// into the backend a unit at a time (a layer, or a vocabulary chunk of the head), as many units kept as the
// budget allows (least recently used leave first); the models of a thread may share that memory.
import * as tf from "@tensorflow/tfjs-core";
import type { LlamaConfig } from "../model/config.js";
import type { LlamaLayer, WeightSource } from "../model/llama.js";
import { filledTensor } from "../model/backend.js";
import { StoredMatrix } from "../model/native.js";
import { LAYER_NAMES, expectedTensors, isMatrixName, type LayerKey } from "../model/weights.js";
import { DTYPE_BYTES, decode, halfToFloat, storedBits, type RawTensor, type WeightDType } from "./safetensors.js";

/** A budget that cannot hold what streaming needs at the least. */
export class StreamError extends Error {
  override name = "StreamError";
}

/** Float32 bytes of one decoder layer on the backend. */
export function layerBytesOf(cfg: LlamaConfig): number {
  let n = 0;
  for (const [name, shape] of expectedTensors(cfg))
    if (name.startsWith("model.layers.0.")) n += 4 * shape.reduce((a, b) => a * b, 1);
  return n;
}

interface Unit {
  tensors: tf.Tensor[];
  bytes: number;
  value: LlamaLayer | tf.Tensor2D;
  stats: { evictions: number }; // its model's counters
}

/**
 * Backend memory for streamed units (layers, head chunks) under one budget, least recently used leaving first.
 * Each streamed model has its own; models of one thread may share one (shareResidency).
 */
export class Residency {
  private readonly units = new Map<string, Unit>();
  private used = 0;

  constructor(/** Float32 bytes the units may take together. */ readonly budget: number) {}

  /** A unit already here (now most recently used), or made by `make` after evicting the least recently used until it fits. */
  get(key: string, bytes: number, make: () => Unit): Unit {
    const hit = this.units.get(key);
    if (hit) {
      this.units.delete(key); // most recently used goes last
      this.units.set(key, hit);
      return hit;
    }
    while (this.units.size && this.used + bytes > this.budget) {
      const [oldest, u] = this.units.entries().next().value as [string, Unit];
      this.drop(oldest, u);
    }
    // kept: the forward pass asks for weights inside a tf.tidy scope, which must not free them
    const u = make();
    for (const t of u.tensors) tf.keep(t);
    this.units.set(key, u);
    this.used += u.bytes;
    return u;
  }

  /** Frees every unit whose key starts with `prefix`, but `except`. */
  release(prefix: string, except?: string): void {
    for (const [key, u] of [...this.units]) if (key.startsWith(prefix) && key !== except) this.drop(key, u);
  }

  private drop(key: string, u: Unit): void {
    this.units.delete(key);
    this.used -= u.bytes;
    for (const t of u.tensors) t.dispose();
    u.stats.evictions++;
  }
}

let nextSource = 0;

/**
 * A stored row-major [rows, cols] matrix (F32, F16 or BF16 bytes) as float32 [cols, rows] in `out`, decoded and
 * transposed in one pass, in tiles that stay in cache.
 */
export function transposedF32(
  dtype: WeightDType,
  bytes: Uint8Array,
  rows: number,
  cols: number,
  out: Float32Array,
): Float32Array {
  const n = rows * cols;
  const bits = new Uint32Array(out.buffer, out.byteOffset, n);
  const src = storedBits(dtype, bytes);
  const TILE = 64;
  for (let r0 = 0; r0 < rows; r0 += TILE) {
    const r1 = Math.min(rows, r0 + TILE);
    for (let c0 = 0; c0 < cols; c0 += TILE) {
      const c1 = Math.min(cols, c0 + TILE);
      for (let r = r0; r < r1; r++) {
        const row = r * cols;
        if (dtype === "BF16") for (let c = c0; c < c1; c++) bits[c * rows + r] = src[row + c]! << 16;
        else if (dtype === "F32") for (let c = c0; c < c1; c++) bits[c * rows + r] = src[row + c]!;
        else for (let c = c0; c < c1; c++) out[c * rows + r] = halfToFloat(src[row + c]!);
      }
    }
  }
  return out.subarray(0, n);
}

export class StreamedWeights implements WeightSource {
  /** Where its units live on the backend: "<id>L3" layer 3, "<id>H2" head chunk 2. */
  private pool: Residency;
  private readonly id = `s${nextSource++}:`;
  readonly layerBytes: number;
  /** Every stored tensor of the model in SharedArrayBuffers, when it was loaded with `shared` (for worker threads). */
  stored?: Map<string, RawTensor>;
  /** How often a unit was brought in, and sent back out. */
  readonly stats = { loads: 0, evictions: 0 };

  /**
   * `head`, when given, streams the head in `chunks` vocabulary chunks from these stored bytes ([vocab, hidden]
   * rows: the embedding when tied, else lm_head.weight); otherwise the head is resident elsewhere.
   */
  constructor(
    readonly cfg: LlamaConfig,
    private readonly raw: Map<string, RawTensor>, // checked at load: F32, F16 or BF16, finite
    /** Float32 bytes the streamed units may take on the backend. */
    readonly budget: number,
    private readonly head?: { raw: RawTensor; chunks: number },
  ) {
    this.layerBytes = layerBytesOf(cfg);
    const need = this.leastBytes;
    if (budget < need)
      throw new StreamError(
        `a memory budget that leaves ${(budget / 2 ** 20).toFixed(0)} MiB for streamed weights cannot hold one layer and one head chunk (${(need / 2 ** 20).toFixed(0)} MiB)`,
      );
    this.pool = new Residency(budget);
  }

  /** Float32 bytes streaming needs at the least: one layer and one head chunk beside it. */
  get leastBytes(): number {
    return this.layerBytes + (this.head ? this.chunkBytes(0) : 0);
  }

  /** Float32 bytes of its largest unit: a layer, or a head chunk when the head is streamed. */
  get unitBytes(): number {
    return Math.max(this.layerBytes, this.head ? this.chunkBytes(0) : 0);
  }

  /** Moves this model's units to `pool` (before any is brought in: what it holds now is freed). */
  usePool(pool: Residency): void {
    this.pool.release(this.id);
    this.pool = pool;
  }

  /** Head chunks: ceil(vocab / size) of size ceil(vocab / chunks asked), so none is empty. */
  get headChunks(): number | undefined {
    return this.head ? Math.ceil(this.cfg.vocabSize / this.chunkSize) : undefined;
  }

  private get chunkSize(): number {
    return Math.ceil(this.cfg.vocabSize / this.head!.chunks);
  }

  /** The vocabulary rows [start, end) of head chunk c. */
  chunkRange(c: number): [number, number] {
    return [c * this.chunkSize, Math.min(this.cfg.vocabSize, (c + 1) * this.chunkSize)];
  }

  private chunkBytes(c: number): number {
    const [a, b] = this.chunkRange(c);
    return 4 * (b - a) * this.cfg.hiddenSize;
  }

  /** How many layers the budget keeps on the backend at once (with one head chunk beside them when streamed). */
  get capacity(): number {
    return Math.min(
      this.cfg.numLayers,
      Math.floor((this.budget - (this.head ? this.chunkBytes(0) : 0)) / this.layerBytes),
    );
  }

  private unit(key: string, bytes: number, make: () => Omit<Unit, "stats">): Unit {
    return this.pool.get(this.id + key, bytes, () => {
      this.stats.loads++;
      return { ...make(), stats: this.stats };
    });
  }

  layer(l: number): LlamaLayer {
    return this.unit(`L${l}`, this.layerBytes, () => {
      const p: Partial<Record<LayerKey, tf.Tensor>> = {};
      for (const [k, suffix] of Object.entries(LAYER_NAMES)) {
        const name = `model.layers.${l}.${suffix}`;
        const t = this.raw.get(name);
        if (!t) continue; // optional biases
        const [rows, cols] = t.shape as [number, number];
        p[k as LayerKey] = isMatrixName(name)
          ? filledTensor([cols, rows], (out) => transposedF32(t.dtype as WeightDType, t.bytes, rows, cols, out))
          : tf.tensor(decode(t.dtype, t.bytes) as Float32Array, t.shape, "float32");
      }
      return { tensors: Object.values(p) as tf.Tensor[], bytes: this.layerBytes, value: p as unknown as LlamaLayer };
    }).value as LlamaLayer;
  }

  /**
   * Head chunk c, the only one of this model on the backend: a pass reads the chunks in order, so holding a few
   * of them never saves a read, and at 1B width the 14 a layer's room held took 0.43 GiB with their packed copies.
   * When the budget holds every layer and the whole head (a model streamed only because its head is larger than
   * one tensor may be, on webgpu) every chunk stays.
   */
  headChunk(c: number): tf.Tensor2D {
    const everything = this.cfg.numLayers * this.layerBytes + 4 * this.cfg.vocabSize * this.cfg.hiddenSize;
    if (this.budget < everything) this.pool.release(`${this.id}H`, `${this.id}H${c}`);
    return this.unit(`H${c}`, this.chunkBytes(c), () => {
      const { raw } = this.head!;
      const [a, b] = this.chunkRange(c);
      const H = this.cfg.hiddenSize;
      const rowBytes = H * DTYPE_BYTES[raw.dtype];
      const t = filledTensor([H, b - a], (out) =>
        transposedF32(raw.dtype as WeightDType, raw.bytes.subarray(a * rowBytes, b * rowBytes), b - a, H, out),
      ) as tf.Tensor2D;
      return { tensors: [t], bytes: this.chunkBytes(c), value: t };
    }).value as tf.Tensor2D;
  }

  embedRows(ids: number[]): tf.Tensor2D {
    return embedRowsOf(this.raw.get("model.embed_tokens.weight")!, this.cfg.hiddenSize, ids);
  }

  dispose(): void {
    this.pool.release(this.id);
  }
}

/**
 * Lets the streamed models of one thread share one Residency that holds one unit, a layer or a head chunk, unless
 * their own budgets hold every layer. A pass reads the layers in order and then the head, so keeping some but not
 * all of them never saves a read; and the models of a run take turns (no pass reads two models' layers at once),
 * so one unit's room serves both: at Llama-3.2-1B width 0.45 GiB with XNNPACK's packed copies (a layer and a head
 * chunk side by side took 0.7; each model's own, 1.4).
 */
export function shareResidency(sources: Array<WeightSource | undefined>): void {
  const streamed = sources.filter((s): s is StreamedWeights => s instanceof StreamedWeights);
  if (streamed.length < 2 || streamed.every((s) => s.capacity >= s.cfg.numLayers)) return;
  const pool = new Residency(Math.max(...streamed.map((s) => s.unitBytes)));
  for (const s of streamed) s.usePool(pool);
}

/** Vocabulary rows of one head chunk of a model read in place: at 1B width a [≤ 256 rows, 8192] logits slice per chunk. */
export const STORED_HEAD_ROWS = 8192;

/**
 * A streamed model read in place by the native matmul: every matrix stays in its stored bytes (BF16, F16 or F32,
 * in Node memory or SharedArrayBuffers that worker threads share) and is multiplied where it lies, so nothing is
 * brought into the backend, decoded ahead or transposed; only the norms and biases (a few KB a layer) are tensors.
 */
export class StoredWeights implements WeightSource {
  private readonly layers: LlamaLayer[] = [];
  /** Every stored tensor of the model in SharedArrayBuffers, when it was loaded with `shared` (for worker threads). */
  stored?: Map<string, RawTensor>;
  readonly headChunks: number;

  constructor(
    readonly cfg: LlamaConfig,
    private readonly raw: Map<string, RawTensor>, // checked at load: F32, F16 or BF16, finite
    /** The head's stored rows [vocab, hidden]: the embedding when tied, else lm_head.weight. */
    private readonly head: RawTensor,
  ) {
    this.headChunks = Math.ceil(cfg.vocabSize / STORED_HEAD_ROWS);
  }

  private matrix(t: RawTensor, rows = t.shape[0]!, from = 0): StoredMatrix {
    const cols = t.shape[1]!;
    const w = DTYPE_BYTES[t.dtype];
    return new StoredMatrix(
      t.bytes.subarray(from * cols * w, (from + rows) * cols * w),
      t.dtype as WeightDType,
      rows,
      cols,
    );
  }

  layer(l: number): LlamaLayer {
    const have = this.layers[l];
    if (have) return have;
    const p: Partial<Record<LayerKey, tf.Tensor | StoredMatrix>> = {};
    for (const [k, suffix] of Object.entries(LAYER_NAMES)) {
      const name = `model.layers.${l}.${suffix}`;
      const t = this.raw.get(name);
      if (!t) continue; // optional biases
      p[k as LayerKey] = isMatrixName(name)
        ? this.matrix(t)
        : tf.keep(tf.tensor(decode(t.dtype, t.bytes) as Float32Array, t.shape, "float32"));
    }
    return (this.layers[l] = p as unknown as LlamaLayer);
  }

  /** The vocabulary rows [start, end) of head chunk c. */
  chunkRange(c: number): [number, number] {
    return [c * STORED_HEAD_ROWS, Math.min(this.cfg.vocabSize, (c + 1) * STORED_HEAD_ROWS)];
  }

  headChunk(c: number): StoredMatrix {
    const [a, b] = this.chunkRange(c);
    return this.matrix(this.head, b - a, a);
  }

  embedRows(ids: number[]): tf.Tensor2D {
    return embedRowsOf(this.raw.get("model.embed_tokens.weight")!, this.cfg.hiddenSize, ids);
  }

  dispose(): void {
    for (const p of this.layers) for (const t of Object.values(p ?? {})) if (t instanceof tf.Tensor) t.dispose();
    this.layers.length = 0;
  }
}

/** Rows `ids` of a stored [vocab, hidden] embedding as float32 [ids.length, hidden]. */
function embedRowsOf(t: RawTensor, H: number, ids: number[]): tf.Tensor2D {
  const rowBytes = H * DTYPE_BYTES[t.dtype];
  const out = new Float32Array(ids.length * H);
  ids.forEach((id, i) =>
    out.set(decode(t.dtype, t.bytes.subarray(id * rowBytes, (id + 1) * rowBytes)) as Float32Array, i * H),
  );
  return tf.tensor2d(out, [ids.length, H]);
}
