// How much memory the engine's runs may take at once: one Limits object, passed in (DEFAULT_LIMITS when left
// out), and the estimates that turn it into how many patched runs go through a layer or the head together.
import type { LlamaConfig } from "../model/config.js";
import {
  GROUPED_ATTENTION_MIN,
  groupedAttention,
  HEAD_BLOCK,
  NATIVE_GROUPED_MIN,
  type HeadBlock,
} from "../model/llama.js";
import { nativeMatMulActive } from "../model/native.js";

/** The engine's memory policy. */
export interface Limits {
  /**
   * Bytes one layer call of stacked runs may take in transient activations (layerActivationBytes); more runs go
   * through the layer in turns. At 1B width one thread's whole 1-pair analysis peaked at 5.77 GiB RSS with
   * 128 MiB and 5.83 with 256, in the same time.
   */
  stackBytes: number;
  /** The scored log-softmax's vocabulary blocks and how many logits a slice of rows holds (model/llama.ts). */
  head: HeadBlock;
}

export const DEFAULT_LIMITS: Readonly<Limits> = Object.freeze({ stackBytes: 2 ** 27, head: HEAD_BLOCK });

/** Score-sized tensors attention holds at once: the scores, scaled, masked and their softmax, and the mask. */
const SCORE_COPIES = 5;

/**
 * An upper estimate of the float32 bytes one layer's transient activations and attention scores take for `rows`
 * rows of T tokens (tested against the wasm heap's own allocations). Batched attention holds every (row, head)'s
 * scores and softmax at once, but only below the length where "auto" attention goes one kv group at a time; packed
 * rows can be shorter than T, so the bound allows either.
 */
export function layerActivationBytes(cfg: LlamaConfig, rows: number, T: number): number {
  const { hiddenSize: H, intermediateSize: I, numHeads: nH, numKvHeads: nKv, headDim: d } = cfg;
  const g = nH / nKv;
  const rowLimit = nativeMatMulActive() ? NATIVE_GROUPED_MIN : (nH * GROUPED_ATTENTION_MIN) / g; // a row's batched scores at most
  const batchedScores = rows * Math.min(nH * T * T, groupedAttention(cfg, T) ? rowLimit : Infinity);
  return 4 * (rows * T * (8 * H + 4 * I + 3 * (nH + 2 * nKv) * d) + SCORE_COPIES * (batchedScores + g * T * T));
}

/**
 * An upper estimate of the float32 bytes one scoring pass of both models holds at its peak: `cachedSites`
 * cached sites per model, one layer's transient activations and attention scores, and the logits (with their
 * log-softmax) at `scored` response positions.
 */
export function scoringBytes(cfg: LlamaConfig, cachedSites: number, rows: number, T: number, scored: number): number {
  const cached = 2 * cachedSites * rows * T * cfg.hiddenSize;
  const logits = 3 * scored * cfg.vocabSize;
  return 4 * (cached + logits) + layerActivationBytes(cfg, rows, T);
}

/** How many stacked copies of `rows` rows of T tokens one layer call may take (at least 1). */
export const stackGroup = (cfg: LlamaConfig, rows: number, T: number, limits: Limits = DEFAULT_LIMITS): number =>
  Math.max(1, Math.floor(limits.stackBytes / layerActivationBytes(cfg, rows, T)));

/**
 * How many stacked copies of `rows` rows of T tokens one head pass may take (at least 1): about two copies of
 * their residuals (the joined input and the forward's own) within stackBytes, as the final norm takes only the
 * scored rows; the logits go through the head in slices of rows (limits.head).
 */
export const headGroup = (cfg: LlamaConfig, rows: number, T: number, limits: Limits = DEFAULT_LIMITS): number =>
  Math.max(1, Math.floor(limits.stackBytes / (8 * rows * T * cfg.hiddenSize)));
