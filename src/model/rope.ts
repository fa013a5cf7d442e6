// Rotary position embedding frequencies (Hugging Face's default, linear and llama3 rope types), in float64.
import type { LlamaConfig } from "./config.js";

/** Inverse frequencies θ_i for i = 0 … head_dim/2 − 1, after the config's rope scaling. */
export function ropeInvFreq(cfg: Pick<LlamaConfig, "headDim" | "ropeTheta" | "ropeScaling">): Float64Array {
  const half = cfg.headDim / 2;
  const inv = new Float64Array(half);
  for (let i = 0; i < half; i++) inv[i] = 1 / cfg.ropeTheta ** ((2 * i) / cfg.headDim);
  const s = cfg.ropeScaling;
  if (s.type === "linear") for (let i = 0; i < half; i++) inv[i] = inv[i]! / s.factor;
  if (s.type === "llama3") {
    const lowWavelen = s.originalMaxPositions / s.lowFreqFactor;
    const highWavelen = s.originalMaxPositions / s.highFreqFactor;
    for (let i = 0; i < half; i++) {
      const f = inv[i]!;
      const wavelen = (2 * Math.PI) / f;
      if (wavelen < highWavelen) continue; // high frequency: unchanged
      if (wavelen > lowWavelen) {
        inv[i] = f / s.factor; // low frequency: fully scaled
        continue;
      }
      const smooth = (s.originalMaxPositions / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
      inv[i] = (1 - smooth) * (f / s.factor) + smooth * f;
    }
  }
  return inv;
}

/** cos and sin tables [T, head_dim] in the half-rotation layout: entry (t, j) uses θ_{j mod head_dim/2}·t. */
export function ropeTables(
  cfg: Pick<LlamaConfig, "headDim" | "ropeTheta" | "ropeScaling">,
  T: number,
): { cos: Float32Array; sin: Float32Array } {
  const inv = ropeInvFreq(cfg);
  const d = cfg.headDim;
  const half = d / 2;
  const cos = new Float32Array(T * d);
  const sin = new Float32Array(T * d);
  for (let t = 0; t < T; t++) {
    for (let j = 0; j < d; j++) {
      const angle = t * inv[j % half]!;
      cos[t * d + j] = Math.cos(angle);
      sin[t * d + j] = Math.sin(angle);
    }
  }
  return { cos, sin };
}
