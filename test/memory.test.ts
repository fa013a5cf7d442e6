// The planner's memory bound: what one layer call allocates in the wasm heap stays within layerActivationBytes,
// the estimate that sizes the sweep's and the low-rank stage's layer calls (Limits.stackBytes, src/engine/limits.ts). Measured from
// the backend's own allocations (wasm _malloc/_free), so this file runs on the wasm heap: on wasm's own kernels,
// and again on the native ones where they are built (their attention goes batched up to other lengths).
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, describe, expect, it } from "vitest";
import { useBackend } from "./helpers.js";
import { filledTensor } from "../src/model/backend.js";
import { loadModelSync } from "../src/io/model.js";
import { disposeModel, forward, groupedAttention, type LlamaModel } from "../src/model/llama.js";
import { nativeStatus, useNativeKernels } from "../src/model/native.js";
import { layerActivationBytes } from "../src/engine/limits.js";

useBackend("wasm");

interface WasmModule {
  _malloc(n: number): number;
  _free(p: number): void;
}

/** The most bytes `f` had allocated in the wasm heap at once beyond what was live when it started. */
function peakAllocated(f: () => void): number {
  const w = (tf.backend() as unknown as { wasm: WasmModule }).wasm;
  w._free(w._malloc(16)); // emscripten swaps in its real _malloc on the first call
  const [malloc, free] = [w._malloc, w._free];
  const sizes = new Map<number, number>();
  let live = 0;
  let peak = 0;
  w._malloc = (n) => {
    const p = malloc.call(w, n);
    sizes.set(p, n);
    peak = Math.max(peak, (live += n));
    return p;
  };
  w._free = (p) => {
    live -= sizes.get(p) ?? 0;
    sizes.delete(p);
    free.call(w, p);
  };
  try {
    f();
  } finally {
    w._malloc = malloc;
    w._free = free;
  }
  return peak;
}

describe("one layer call", () => {
  const models: LlamaModel[] = [];
  afterAll(() => {
    models.forEach(disposeModel);
    useNativeKernels(false);
  });

  for (const [kernels, dir, shapes] of [
    [
      "wasm",
      "fixtures/models/llama-tiny-a",
      [
        [1, 16],
        [3, 60],
        [2, 250],
      ],
    ],
    [
      "wasm",
      "fixtures/models/stories260k",
      [
        [2, 40],
        [3, 90],
        [4, 128],
        [1, 500],
      ],
    ],
    [
      "native",
      "fixtures/models/llama-tiny-a",
      [
        [1, 16],
        [3, 60],
        [2, 400],
        [1, 520],
      ],
    ],
    [
      "native",
      "fixtures/models/stories260k",
      [
        [2, 40],
        [3, 90],
        [4, 128],
        [1, 600],
      ],
    ],
  ] as const) {
    it.skipIf(kernels === "native" && !nativeStatus().ok)(
      `allocates at most layerActivationBytes, with batched attention at short rows and grouped at long (${dir}, ${kernels} kernels)`,
      () => {
        useNativeKernels(kernels === "native");
        const model = loadModelSync(dir);
        models.push(model);
        const grouped = new Set<boolean>();
        for (const [B, T] of shapes) {
          const ids = Array.from({ length: B }, (_, b) =>
            Array.from({ length: T }, (_, t) => (b * 7 + t * 13) % model.config.vocabSize),
          );
          const resid = tf.randomNormal([B, T, model.config.hiddenSize], 0, 1, "float32", 5);
          const bound = layerActivationBytes(model.config, B, T);
          const peak = peakAllocated(() =>
            forward(model, ids, {
              start: { layer: 1, resid },
              stopAfter: 1,
              logitsAt: "none",
              cache: ["blocks.1.hook_resid_post"],
            }).dispose(),
          );
          resid.dispose();
          grouped.add(groupedAttention(model.config, T));
          // not vacuous: the call allocates a good part of its bound
          expect({ B, T, within: peak <= bound, substantial: peak >= 0.25 * bound }).toEqual({
            B,
            T,
            within: true,
            substantial: true,
          });
        }
        expect(grouped).toEqual(new Set([true, false])); // both attention kernels ran
      },
    );
  }
});

describe("streamed weights", () => {
  it("are decoded straight into the wasm heap, with no Node-side copy on the way", () => {
    const heap = () => (tf.backend() as unknown as { wasm: { HEAPU8: Uint8Array } }).wasm.HEAPU8.buffer;
    const want = Float32Array.from({ length: 6 }, (_, i) => i * 0.5 - 1);
    let target: ArrayBufferLike | null = null;
    const t = filledTensor([2, 3], (out) => {
      target = out.buffer;
      out.set(want);
    });
    expect(target).toBe(heap());
    expect(Array.from(t.dataSync())).toEqual(Array.from(want));
    t.dispose();
    // a fill that fails leaves nothing allocated
    const before = (tf.backend() as unknown as { numDataIds(): number }).numDataIds();
    expect(() =>
      filledTensor([2, 3], () => {
        throw new Error("bad bytes");
      }),
    ).toThrow("bad bytes");
    expect((tf.backend() as unknown as { numDataIds(): number }).numDataIds()).toBe(before);
  });
});
