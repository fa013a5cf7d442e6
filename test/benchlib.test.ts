// bench:1b's count of the work it compares with the PyTorch peer: the closed form against an enumeration of the
// runs each way makes, and the FLOPs of one layer against a count by hand.
import { describe, expect, it } from "vitest";
import { layerFlops, sweepFlops } from "../bench/lib.js";
import { llama1bConfig } from "../bench/llama-1b-shaped.js";

describe("sweepFlops", () => {
  it("is the enumerated runs' layers and head positions, prefprobe's and the peer's", () => {
    for (const layers of [2, 5, 16]) {
      const cfg = llama1bConfig(layers);
      const t = { prompt: 80, chosen: 65, rejected: 77 };
      const head = 2 * cfg.hiddenSize * cfg.vocabSize;
      let prefprobe = 0;
      let peer = 0;
      // clean base and tuned runs, then one run per patched layer l (resid_post: tuned up to l, base above it)
      const runs: Array<{ from: number }> = [
        { from: 0 },
        { from: 0 },
        ...Array.from({ length: layers }, (_, l) => ({ from: l + 1 })),
      ];
      for (const r of runs) {
        for (let l = r.from; l < layers; l++) prefprobe += layerFlops(cfg, 1, t.prompt + t.chosen + t.rejected);
        prefprobe += (t.chosen + t.rejected) * head;
        for (let l = 0; l < layers; l++) peer += layerFlops(cfg, 2, t.prompt + t.rejected); // the longer response pads
        peer += 2 * (t.prompt + t.rejected) * head;
      }
      expect(sweepFlops(cfg, t)).toEqual({ prefprobe, peer });
    }
  });

  it("counts a Llama-3.2-1B layer as its matmuls and attention", () => {
    const cfg = llama1bConfig(16);
    // q, o: 2048×2048; k, v: 2048×512; gate, up, down: 2048×8192; attention: QKᵀ and PV over 32 heads of 64
    const perToken = 2 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192);
    expect(layerFlops(cfg, 1, 100)).toBe(100 * perToken + 2 * 2 * 32 * 100 * 100 * 64);
  });
});
