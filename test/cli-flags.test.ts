// The CLI reports a library error's setting names as the flags that set them.
import { describe, expect, it } from "vitest";
import { withFlags } from "../src/cli-flags.js";

describe("withFlags", () => {
  it("names camelCase settings anywhere, one-word settings only where a message starts with them", () => {
    expect(withFlags("on wasm this is its heap running out: a smaller memoryBudget or batchPairs needs less")).toBe(
      "on wasm this is its heap running out: a smaller --memory-budget or --batch needs less",
    );
    expect(withFlags('train pattern "x" matches no weight')).toBe('--train pattern "x" matches no weight');
    expect(withFlags("rank 33 is more than w can take")).toBe("--rank 33 is more than w can take");
    expect(withFlags("the rank of a matrix, trained weights")).toBe("the rank of a matrix, trained weights");
    expect(withFlags("pcaLayer 9 is outside 0..4")).toBe("--pca-layer 9 is outside 0..4");
    expect(withFlags("maxTokensX is not a setting")).toBe("maxTokensX is not a setting");
    // names inside a dotted path are keys and files, not flags
    expect(withFlags("settings.stabilityReps: 2 vs 5")).toBe("settings.stabilityReps: 2 vs 5");
    expect(withFlags("use a smaller memoryBudget.")).toBe("use a smaller --memory-budget.");
    // a one-letter setting (the probes' C) is an ordinary letter inside a sentence
    expect(withFlags("it needs a C compiler")).toBe("it needs a C compiler");
    expect(withFlags("C must be positive, got 0")).toBe("--C must be positive, got 0");
    expect(withFlags("subspace.safetensors: not found")).toBe("subspace.safetensors: not found");
    expect(withFlags("subspace has width 64, the model 32")).toBe("--subspace has width 64, the model 32");
  });
});
