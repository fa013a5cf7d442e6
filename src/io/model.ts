// Loads a Hugging Face Llama folder (config.json + safetensors, single or sharded) into a LlamaModel,
// checking every tensor's name and shape against the config, and writes a model back out.
import * as fs from "node:fs";
import * as path from "node:path";
import * as tf from "@tensorflow/tfjs-core";
import { configToJson, loadConfig, type LlamaConfig } from "./config.js";
import { iterSafetensorsFolder, writeSafetensors, type DType, type TensorToWrite } from "./safetensors.js";
import type { LlamaLayer, LlamaModel } from "../model/llama.js";

/** A model folder whose weights do not match what its config describes. */
export class ModelError extends Error {
  override name = "ModelError";
}

type LayerKey = keyof LlamaLayer;

/** Layer fields that are matrices: stored [in, out] in the model, [out, in] on disk. */
const MATRICES = new Set<LayerKey>(["q", "k", "v", "o", "gate", "up", "down"]);

/** Row-major [rows, cols] → [cols, rows]. */
export function transposeData(data: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(data.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = data[r * cols + c]!;
  return out;
}

const isMatrixName = (name: string) =>
  name === "lm_head.weight" || [...MATRICES].some((k) => name.startsWith("model.layers.") && name.endsWith(LAYER_NAMES[k]));

/** Hugging Face tensor name suffix (under model.layers.{l}.) for each LlamaLayer field. */
const LAYER_NAMES: Record<LayerKey, string> = {
  inputNorm: "input_layernorm.weight",
  q: "self_attn.q_proj.weight",
  k: "self_attn.k_proj.weight",
  v: "self_attn.v_proj.weight",
  o: "self_attn.o_proj.weight",
  qBias: "self_attn.q_proj.bias",
  kBias: "self_attn.k_proj.bias",
  vBias: "self_attn.v_proj.bias",
  oBias: "self_attn.o_proj.bias",
  postNorm: "post_attention_layernorm.weight",
  gate: "mlp.gate_proj.weight",
  up: "mlp.up_proj.weight",
  down: "mlp.down_proj.weight",
  gateBias: "mlp.gate_proj.bias",
  upBias: "mlp.up_proj.bias",
  downBias: "mlp.down_proj.bias",
};

/** Every tensor name a config implies, with its expected shape. */
export function expectedTensors(cfg: LlamaConfig): Map<string, number[]> {
  const { hiddenSize: H, intermediateSize: I, numHeads: nH, numKvHeads: nKv, headDim: d, vocabSize: V } = cfg;
  const m = new Map<string, number[]>();
  m.set("model.embed_tokens.weight", [V, H]);
  for (let l = 0; l < cfg.numLayers; l++) {
    const shapes: Partial<Record<LayerKey, number[]>> = {
      inputNorm: [H],
      q: [nH * d, H],
      k: [nKv * d, H],
      v: [nKv * d, H],
      o: [H, nH * d],
      postNorm: [H],
      gate: [I, H],
      up: [I, H],
      down: [H, I],
    };
    if (cfg.attentionBias) Object.assign(shapes, { qBias: [nH * d], kBias: [nKv * d], vBias: [nKv * d], oBias: [H] });
    if (cfg.mlpBias) Object.assign(shapes, { gateBias: [I], upBias: [I], downBias: [H] });
    for (const [k, s] of Object.entries(shapes)) m.set(`model.layers.${l}.${LAYER_NAMES[k as LayerKey]}`, s);
  }
  m.set("model.norm.weight", [H]);
  if (!cfg.tieWordEmbeddings) m.set("lm_head.weight", [V, H]);
  return m;
}

/** Float32 bytes the weights of a config take once loaded. */
export function weightBytes(cfg: LlamaConfig): number {
  let n = 0;
  for (const s of expectedTensors(cfg).values()) n += s.reduce((a, b) => a * b, 1);
  return n * 4;
}

/** Largest model (float32 weight bytes) the wasm backend is allowed to load; its heap is 4 GiB in all. */
export const WASM_WEIGHT_LIMIT = 3 * 2 ** 30;

/** Loads a Hugging Face Llama folder onto the current tfjs backend. */
export function loadModel(dir: string): LlamaModel {
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new ModelError(`${dir}: not a folder`);
  const cfg = loadConfig(dir);
  const need = weightBytes(cfg);
  if (tf.getBackend() === "wasm" && need > WASM_WEIGHT_LIMIT) {
    throw new ModelError(
      `${dir}: the weights need ${(need / 2 ** 30).toFixed(2)} GiB as float32, more than the wasm backend's 4 GiB heap can hold with activations; install @tensorflow/tfjs-node to run it`,
    );
  }
  const expected = expectedTensors(cfg);
  const got = new Map<string, tf.Tensor>();
  let tiedHead: tf.Tensor | null = null;
  try {
    for (const [name, t] of iterSafetensorsFolder(dir)) {
      if (name.endsWith("rotary_emb.inv_freq")) continue; // recomputed from the config
      if (name === "lm_head.weight" && cfg.tieWordEmbeddings) continue; // tied: the embedding is the head
      const shape = expected.get(name);
      if (!shape) throw new ModelError(`${dir}: unexpected tensor "${name}" (not part of a Llama model with this config)`);
      if (!tf.util.arraysEqual(shape, t.shape)) throw new ModelError(`${dir}: tensor "${name}" has shape [${t.shape}], config implies [${shape}]`);
      if (!(t.data instanceof Float32Array)) throw new ModelError(`${dir}: tensor "${name}" has dtype ${t.dtype}; weights must be F32, F16 or BF16`);
      if (isMatrixName(name)) got.set(name, tf.tensor(transposeData(t.data, shape[0]!, shape[1]!), [shape[1]!, shape[0]!], "float32"));
      else got.set(name, tf.tensor(t.data, shape, "float32"));
      if (name === "model.embed_tokens.weight" && cfg.tieWordEmbeddings) tiedHead = tf.tensor(transposeData(t.data, shape[0]!, shape[1]!), [shape[1]!, shape[0]!], "float32");
    }
    for (const name of expected.keys()) if (!got.has(name)) throw new ModelError(`${dir}: missing tensor "${name}"`);
  } catch (e) {
    for (const t of got.values()) t.dispose();
    tiedHead?.dispose();
    throw e;
  }
  const w = (n: string) => got.get(n)!;
  const layers: LlamaLayer[] = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    const p: Partial<Record<LayerKey, tf.Tensor>> = {};
    for (const [k, suffix] of Object.entries(LAYER_NAMES)) {
      const t = got.get(`model.layers.${l}.${suffix}`);
      if (t) p[k as LayerKey] = t;
    }
    layers.push(p as unknown as LlamaLayer);
  }
  const embed = w("model.embed_tokens.weight") as tf.Tensor2D;
  return {
    config: cfg,
    embed,
    layers,
    finalNorm: w("model.norm.weight") as tf.Tensor1D,
    lmHead: (tiedHead ?? w("lm_head.weight")) as tf.Tensor2D,
  };
}

/** The model's weights by Hugging Face name and in Hugging Face layout (tied models omit lm_head.weight). */
export function namedWeights(model: LlamaModel): Map<string, { shape: number[]; data: Float32Array }> {
  return new Map(
    weightRefs(model).map(({ name, tensor: t, matrix }) => {
      const data = t.dataSync() as Float32Array;
      if (!matrix) return [name, { shape: t.shape, data: Float32Array.from(data) }];
      return [name, { shape: [t.shape[1]!, t.shape[0]!], data: transposeData(data, t.shape[0]!, t.shape[1]!) }];
    }),
  );
}

/** Writes config.json and model.safetensors for a model (F32 by default, or BF16/F16). */
export function saveModel(model: LlamaModel, dir: string, dtype: Extract<DType, "F32" | "BF16" | "F16"> = "F32"): void {
  fs.mkdirSync(dir, { recursive: true });
  const tensors: Record<string, TensorToWrite> = {};
  for (const [name, t] of namedWeights(model)) tensors[name] = { dtype, ...t };
  writeSafetensors(path.join(dir, "model.safetensors"), tensors, { format: "pt" });
  const torchDtype = { F32: "float32", BF16: "bfloat16", F16: "float16" }[dtype];
  writeFileAtomic(path.join(dir, "config.json"), JSON.stringify(configToJson(model.config, torchDtype), null, 2) + "\n");
}

/**
 * Writes a complete model folder (config, weights, tokenizer files and licence copied from `copyFrom`, any
 * extra files) into a temporary sibling, then moves it into place, replacing `dir`: never a half-written model.
 */
export function saveModelFolder(model: LlamaModel, dir: string, opts: { copyFrom?: string; extraFiles?: Record<string, string> } = {}): void {
  const tmp = `${dir}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true });
  try {
    saveModel(model, tmp);
    for (const f of ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "LICENSE"]) {
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

/** One weight of a loaded model: its Hugging Face name, tensor, and whether it is a matrix stored [in, out]. */
export interface WeightRef {
  name: string;
  tensor: tf.Tensor;
  matrix: boolean;
}

/** Every weight of a model by Hugging Face name (the head only when untied). */
export function weightRefs(model: LlamaModel): WeightRef[] {
  const refs: WeightRef[] = [{ name: "model.embed_tokens.weight", tensor: model.embed, matrix: false }];
  model.layers.forEach((p, l) => {
    for (const [k, t] of Object.entries(p)) if (t) refs.push({ name: `model.layers.${l}.${LAYER_NAMES[k as LayerKey]}`, tensor: t as tf.Tensor, matrix: MATRICES.has(k as LayerKey) });
  });
  refs.push({ name: "model.norm.weight", tensor: model.finalNorm, matrix: false });
  if (!model.config.tieWordEmbeddings) refs.push({ name: "lm_head.weight", tensor: model.lmHead, matrix: true });
  return refs;
}

/**
 * A model sharing every weight of `model` except those named in `replace` (Hugging Face names, values in
 * the model's own layout). With tied embeddings a new embedding also becomes the head.
 */
export function withWeights(model: LlamaModel, replace: Map<string, tf.Tensor>): LlamaModel {
  const layers = model.layers.map((p, l) => {
    const q: Record<string, tf.Tensor | undefined> = { ...p };
    for (const k of Object.keys(p)) {
      const t = replace.get(`model.layers.${l}.${LAYER_NAMES[k as LayerKey]}`);
      if (t) q[k] = t;
    }
    return q as unknown as LlamaLayer;
  });
  const embed = (replace.get("model.embed_tokens.weight") ?? model.embed) as tf.Tensor2D;
  const tiedHead = model.config.tieWordEmbeddings && replace.has("model.embed_tokens.weight") ? (tf.transpose(embed) as tf.Tensor2D) : null;
  return {
    config: model.config,
    embed,
    layers,
    finalNorm: (replace.get("model.norm.weight") ?? model.finalNorm) as tf.Tensor1D,
    lmHead: tiedHead ?? ((replace.get("lm_head.weight") ?? model.lmHead) as tf.Tensor2D),
  };
}
