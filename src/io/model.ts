// Loads a Hugging Face Llama folder (config.json + safetensors, single or sharded) into a LlamaModel,
// checking every tensor's name and shape against the config, and writes a model back out.
import * as fs from "node:fs";
import * as path from "node:path";
import * as tf from "@tensorflow/tfjs-core";
import { configToJson, type LlamaConfig } from "../model/config.js";
import { ensureBackend, maxTensorBytes } from "../model/backend.js";
import { loadConfig } from "./config.js";
import {
  DTYPE_BYTES,
  decode,
  iterRawSafetensorsFolder,
  storedBits,
  writeSafetensors,
  type DType,
  type WeightDType,
  type RawTensor,
  type TensorToWrite,
} from "./safetensors.js";
import { layerBytesOf, StoredWeights, StreamedWeights } from "./stream.js";
import { nativeMatMulActive, nativeStatus } from "../model/native.js";
import type { LlamaLayer, LlamaModel } from "../model/llama.js";
import { loadTokenizer, type TextTokenizer } from "./tokenizer.js";
import {
  LAYER_NAMES,
  expectedTensors,
  isMatrixName,
  namedWeights,
  transposeData,
  weightBytes,
  type LayerKey,
} from "../model/weights.js";

/** A model folder whose weights do not match what its config describes. */
export class ModelError extends Error {
  override name = "ModelError";
}

/** Index of the first NaN or ±Infinity in stored F32, F16 or BF16 bytes (all exponent bits set), or −1; read without decoding. */
export function firstNonFinite(dtype: WeightDType, bytes: Uint8Array): number {
  const u = storedBits(dtype, bytes);
  const mask = { F32: 0x7f800000, F16: 0x7c00, BF16: 0x7f80 }[dtype];
  for (let i = 0; i < u.length; i++) if ((u[i]! & mask) === mask) return i;
  return -1;
}

/** Float32 weight bytes one model keeps on the wasm backend by default (its heap is 4 GiB in all); more is streamed. */
export const WASM_WEIGHT_LIMIT = 3 * 2 ** 30;

/** How a model is loaded. */
export interface LoadOptions {
  /**
   * Float32 bytes of weights this model may keep on the backend. A model that needs more is streamed: its
   * weights stay in Node memory in their file dtype, the head stays resident, and layers are brought in as
   * needed, as many kept as fit. On wasm each weight counts twice (backendCopies). Default: WASM_WEIGHT_LIMIT on
   * wasm, everything elsewhere.
   */
  memoryBudget?: number;
  /**
   * Keep a streamed model's stored bytes in SharedArrayBuffers and list them in `source.stored`, so that worker
   * threads can load the same model from them (`stored`) without reading or copying the files.
   */
  shared?: boolean;
  /** A streamed model's stored tensors from another thread's load with `shared` (already checked): used instead of the folder's files. */
  stored?: Map<string, RawTensor>;
  /**
   * How a streamed model uses its stored weights: "in-place", the native matmul multiplies by them where they
   * lie (the default when tf.matMul runs on it), or "bring-in", layers and head chunks are decoded into the
   * backend as needed, as many kept as the budget holds (the default elsewhere).
   */
  stream?: "in-place" | "bring-in";
  /**
   * The most bytes one weight tensor may take on the backend. Default: maxTensorBytes(), on webgpu the device's
   * buffer binding limit (128 MiB on llvmpipe), elsewhere no limit. A model whose embedding or head is larger is
   * streamed, its head in vocabulary chunks within the limit, its embedding rows decoded from the stored bytes;
   * its layers stay on the backend when the budget holds them.
   */
  tensorLimit?: number;
}

/** Loads a Hugging Face Llama folder (config.json + safetensors), starting the best tfjs backend if none is running. */
export async function loadModel(dir: string, opts: LoadOptions = {}): Promise<LlamaModel> {
  await ensureBackend();
  return loadModelSync(dir, opts);
}

/** Float32 bytes a model keeps on the backend when fully resident (with a tied head's transposed copy). */
export function residentBytes(cfg: LlamaConfig): number {
  return weightBytes(cfg) + (cfg.tieWordEmbeddings ? 4 * cfg.vocabSize * cfg.hiddenSize : 0);
}

/** The weight tensors of a folder, checked against the config (names, shapes, dtypes, finite values). */
function* checkedTensors(
  dir: string,
  cfg: LlamaConfig,
  opts: LoadOptions = {},
): Generator<[string, RawTensor, () => Float32Array]> {
  if (opts.stored) {
    for (const [name, t] of opts.stored) yield [name, t, () => decode(t.dtype, t.bytes) as Float32Array];
    return;
  }
  const expected = expectedTensors(cfg);
  const seen = new Set<string>();
  for (const [name, t] of iterRawSafetensorsFolder(dir, { shared: opts.shared })) {
    if (name.endsWith("rotary_emb.inv_freq")) continue; // recomputed from the config
    if (name === "lm_head.weight" && cfg.tieWordEmbeddings) continue; // tied: the embedding is the head
    const shape = expected.get(name);
    if (!shape)
      throw new ModelError(`${dir}: unexpected tensor "${name}" (not part of a Llama model with this config)`);
    if (!tf.util.arraysEqual(shape, t.shape))
      throw new ModelError(`${dir}: tensor "${name}" has shape [${t.shape}], config implies [${shape}]`);
    if (t.dtype !== "F32" && t.dtype !== "F16" && t.dtype !== "BF16")
      throw new ModelError(`${dir}: tensor "${name}" has dtype ${t.dtype}; weights must be F32, F16 or BF16`);
    const bad = firstNonFinite(t.dtype, t.bytes);
    const w = DTYPE_BYTES[t.dtype];
    if (bad >= 0)
      throw new ModelError(
        `${dir}: tensor "${name}" holds ${decode(t.dtype, t.bytes.slice(bad * w, (bad + 1) * w))[0]} at flat index ${bad}: the weights are corrupt (NaN/Inf)`,
      );
    seen.add(name);
    // decoded only when asked: a streamed model keeps the stored bytes and decodes a layer when it is brought in
    yield [name, t, () => decode(t.dtype, t.bytes) as Float32Array];
  }
  for (const name of expected.keys()) if (!seen.has(name)) throw new ModelError(`${dir}: missing tensor "${name}"`);
}

/** A float32 tensor in the model's layout: matrices transposed from [out, in] to [in, out]. */
function toBackend(name: string, shape: number[], data: Float32Array): tf.Tensor {
  return isMatrixName(name)
    ? tf.tensor(transposeData(data, shape[0]!, shape[1]!), [shape[1]!, shape[0]!], "float32")
    : tf.tensor(data, shape, "float32");
}

/** The tied head [hidden, vocab] from the embedding's values. */
const tiedHeadOf = (data: Float32Array, shape: number[]) =>
  tf.tensor(transposeData(data, shape[0]!, shape[1]!), [shape[1]!, shape[0]!], "float32") as tf.Tensor2D;

/**
 * Copies of each weight the backend holds: 2 on wasm, whose matmuls keep an XNNPACK-packed copy of every
 * weight matrix they have used, else 1. Budgets count weights this many times.
 */
export const backendCopies = (): number => (tf.getBackend() === "wasm" && !nativeMatMulActive() ? 2 : 1);

/**
 * Loads a Hugging Face Llama folder onto the current tfjs backend (streamed when it exceeds the memory budget).
 * The model carries the folder's tokenizer as `model.tokenizer`, read on first use.
 */
export function loadModelSync(dir: string, opts: LoadOptions = {}): LlamaModel {
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new ModelError(`${dir}: not a folder`);
  const cfg = loadConfig(dir);
  const budget = (opts.memoryBudget ?? (tf.getBackend() === "wasm" ? WASM_WEIGHT_LIMIT : Infinity)) / backendCopies();
  const limit = tensorLimitFor(dir, cfg, opts);
  const resident = residentBytes(cfg) <= budget && 4 * cfg.vocabSize * cfg.hiddenSize <= limit;
  if (opts.stored && resident) throw new ModelError(`${dir}: stored weights are only for a streamed model`);
  return withTokenizer(resident ? loadResident(dir, cfg) : loadStreamed(dir, cfg, budget, opts, limit), dir);
}

/**
 * Gives a model its folder's tokenizer as a lazy property: read on first use (a model used on ids never reads
 * it, and a tokenizer this project cannot load fails where text is tokenized, not at load), and not enumerable,
 * so copying or serializing a model does not read it.
 */
function withTokenizer(model: LlamaModel, dir: string): LlamaModel {
  let tok: TextTokenizer | null | undefined;
  Object.defineProperty(model, "tokenizer", {
    get: () => (tok === undefined ? (tok = loadTokenizer(dir)) : tok),
    enumerable: false,
  });
  return model;
}

const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(bytes < 2 ** 24 ? 2 : 0);

/**
 * opts.tensorLimit, else maxTensorBytes(); checked against the layers' matrices, which are never split (at
 * Llama-3.2-1B width the largest is 64 MiB, at 8B 224 MiB).
 */

function tensorLimitFor(dir: string, cfg: LlamaConfig, opts: LoadOptions): number {
  const limit = opts.tensorLimit ?? maxTensorBytes();
  const largest = 4 * cfg.hiddenSize * Math.max(cfg.intermediateSize, cfg.numHeads * cfg.headDim);
  if (largest > limit)
    throw new ModelError(
      `${dir}: a layer's largest matrix takes ${mib(largest)} MiB as float32, more than one tensor may take on this backend (${mib(limit)} MiB: on webgpu the GPU's buffer binding limit)`,
    );
  if (4 * cfg.hiddenSize > limit)
    throw new ModelError(
      `${dir}: one embedding row is larger than one tensor may take on this backend (${limit} bytes)`,
    );
  return limit;
}

function loadResident(dir: string, cfg: LlamaConfig): LlamaModel {
  const got = new Map<string, tf.Tensor>();
  let tiedHead: tf.Tensor2D | null = null;
  try {
    for (const [name, t, data] of checkedTensors(dir, cfg)) {
      const values = data();
      got.set(name, toBackend(name, t.shape, values));
      if (name === "model.embed_tokens.weight" && cfg.tieWordEmbeddings) tiedHead = tiedHeadOf(values, t.shape);
    }
  } catch (e) {
    for (const t of got.values()) t.dispose();
    tiedHead?.dispose();
    throw e;
  }
  const w = (n: string) => got.get(n)!;
  const layers: LlamaLayer<tf.Tensor2D>[] = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    const p: Partial<Record<LayerKey, tf.Tensor>> = {};
    for (const [k, suffix] of Object.entries(LAYER_NAMES)) {
      const t = got.get(`model.layers.${l}.${suffix}`);
      if (t) p[k as LayerKey] = t;
    }
    layers.push(p as unknown as LlamaLayer<tf.Tensor2D>);
  }
  return {
    config: cfg,
    embed: w("model.embed_tokens.weight") as tf.Tensor2D,
    layers,
    finalNorm: w("model.norm.weight") as tf.Tensor1D,
    lmHead: (tiedHead ?? w("lm_head.weight")) as tf.Tensor2D,
  };
}

/**
 * A streamed model: the final norm on the backend, layers and embedding rows from stored bytes. With the native
 * matmul every matrix is read where it lies (StoredWeights); else layers and head chunks are brought in
 * (StreamedWeights), and the head stays resident when the budget holds it.
 */
function loadStreamed(dir: string, cfg: LlamaConfig, budget: number, opts: LoadOptions, limit: number): LlamaModel {
  const H = cfg.hiddenSize;
  const inPlace = (opts.stream ?? (nativeMatMulActive() ? "in-place" : "bring-in")) === "in-place";
  if (inPlace && tf.getBackend() !== "wasm")
    throw new ModelError(
      `${dir}: a model read in place needs the native matmul on the wasm backend (the backend is ${tf.getBackend()})`,
    );
  if (inPlace) {
    const status = nativeStatus();
    if (!status.ok)
      throw new ModelError(
        `${dir}: a model read in place needs the native matmul, which is not available here: ${status.why}`,
      );
    return loadInPlace(dir, cfg, opts);
  }
  const headBytes = 4 * cfg.vocabSize * H;
  const layerBytes = layerBytesOf(cfg);
  // the head stays resident when it fits beside one layer and within one tensor; else it is streamed in the
  // fewest vocabulary chunks of which one fits beside one layer, and within one tensor
  const least = Math.max(1, Math.ceil(cfg.vocabSize / Math.floor(limit / (4 * H)))); // chunks of at most `limit` bytes
  const chunks =
    least <= 1 && budget - headBytes - 4 * H >= layerBytes
      ? 0
      : [8, 16, 32, 64, 128, least]
          .filter((c) => c >= least)
          .find((c) => budget - 4 * H - Math.ceil(cfg.vocabSize / c) * 4 * H >= layerBytes);
  if (chunks === undefined) {
    const k = backendCopies();
    const copies = k > 1 ? ` (each counted ${k}x: the backend keeps a packed copy)` : "";
    throw new ModelError(
      `${dir}: a memory budget of ${((k * budget) / 2 ** 30).toFixed(2)} GiB cannot hold one layer (${((k * layerBytes) / 2 ** 30).toFixed(2)} GiB) and a 128th of the head (${((k * headBytes) / 128 / 2 ** 30).toFixed(2)} GiB) as float32${copies}; raise memoryBudget`,
    );
  }
  const raw = new Map<string, RawTensor>();
  const stored = new Map<string, RawTensor>();
  let head: tf.Tensor2D | null = null;
  let finalNorm: tf.Tensor1D | null = null;
  try {
    for (const [name, t, data] of checkedTensors(dir, cfg, opts)) {
      if (opts.shared) stored.set(name, t);
      if (name === "model.norm.weight") finalNorm = tf.tensor1d(data());
      else if (name === "lm_head.weight" && !chunks) head = toBackend(name, t.shape, data()) as tf.Tensor2D;
      else {
        raw.set(name, t);
        if (name === "model.embed_tokens.weight" && cfg.tieWordEmbeddings && !chunks)
          head = tiedHeadOf(data(), t.shape);
      }
    }
    const headRaw = raw.get(cfg.tieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight");
    const resident = chunks ? 4 * H : headBytes + 4 * H;
    const source = new StreamedWeights(cfg, raw, budget - resident, chunks ? { raw: headRaw!, chunks } : undefined);
    if (opts.shared) source.stored = stored;
    return {
      config: cfg,
      embed: tf.zeros([0, H]) as tf.Tensor2D,
      layers: [],
      finalNorm: finalNorm!,
      lmHead: head ?? (tf.zeros([H, 0]) as tf.Tensor2D),
      source,
    };
  } catch (e) {
    head?.dispose();
    finalNorm?.dispose();
    throw e;
  }
}

/** A streamed model whose matrices the native matmul reads in their stored bytes. */
function loadInPlace(dir: string, cfg: LlamaConfig, opts: LoadOptions): LlamaModel {
  const raw = new Map<string, RawTensor>();
  let finalNorm: tf.Tensor1D | null = null;
  try {
    for (const [name, t, data] of checkedTensors(dir, cfg, opts)) {
      if (name === "model.norm.weight") finalNorm = tf.tensor1d(data());
      raw.set(name, t);
    }
  } catch (e) {
    finalNorm?.dispose();
    throw e;
  }
  const source = new StoredWeights(
    cfg,
    raw,
    raw.get(cfg.tieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight")!,
  );
  if (opts.shared) source.stored = raw;
  const H = cfg.hiddenSize;
  return {
    config: cfg,
    embed: tf.zeros([0, H]) as tf.Tensor2D,
    layers: [],
    finalNorm: finalNorm!,
    lmHead: tf.zeros([H, 0]) as tf.Tensor2D,
    source,
  };
}

/** Writes config.json and model.safetensors for a model (F32 by default, or BF16/F16). */
export function saveModel(model: LlamaModel, dir: string, dtype: Extract<DType, "F32" | "BF16" | "F16"> = "F32"): void {
  fs.mkdirSync(dir, { recursive: true });
  const tensors: Record<string, TensorToWrite> = {};
  for (const [name, t] of namedWeights(model)) tensors[name] = { dtype, ...t };
  writeSafetensors(path.join(dir, "model.safetensors"), tensors, { format: "pt" });
  const torchDtype = { F32: "float32", BF16: "bfloat16", F16: "float16" }[dtype];
  writeFileAtomic(
    path.join(dir, "config.json"),
    JSON.stringify(configToJson(model.config, torchDtype), null, 2) + "\n",
  );
}

/**
 * Writes a complete model folder (config, weights, tokenizer files and licence copied from `copyFrom`, any
 * extra files) into a temporary sibling, then moves it into place, replacing `dir`: never a half-written model.
 */
export function saveModelFolder(
  model: LlamaModel,
  dir: string,
  opts: { copyFrom?: string; extraFiles?: Record<string, string> } = {},
): void {
  const tmp = `${dir}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true });
  try {
    saveModel(model, tmp);
    for (const f of [
      "tokenizer.json",
      "tokenizer_config.json",
      "chat_template.jinja",
      "special_tokens_map.json",
      "generation_config.json",
      "LICENSE",
    ]) {
      const src = opts.copyFrom ? path.join(opts.copyFrom, f) : "";
      if (src && fs.existsSync(src)) fs.copyFileSync(src, path.join(tmp, f));
    }
    for (const [name, text] of Object.entries(opts.extraFiles ?? {})) fs.writeFileSync(path.join(tmp, name), text);
    fs.rmSync(dir, { recursive: true, force: true });
    fs.renameSync(tmp, dir);
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
}

/** Writes a text file through a temporary file and a rename, so it is never half-written. */
export function writeFileAtomic(file: string, text: string | Uint8Array): void {
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, text);
  fs.renameSync(tmp, file);
}
