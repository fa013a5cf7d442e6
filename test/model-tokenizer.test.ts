// A loaded model carries its folder's tokenizer, read on first use: one call from text pairs to margins needs
// nothing else, and a folder without a tokenizer gives null (and text pairs a one-line error).
import { afterAll, describe, expect, it } from "vitest";
import { loadModelSync } from "../src/io/model.js";
import { loadTokenizer } from "../src/io/tokenizer.js";
import { margins } from "../src/io/margins.js";
import { tokenizePairs } from "../src/io/pairs.js";
import { disposeModel, type LlamaModel } from "../src/model/llama.js";
import { useBackend } from "./helpers.js";

useBackend();

const made: LlamaModel[] = [];
const load = (dir: string) => (made.push(loadModelSync(dir)), made.at(-1)!);
afterAll(() => made.forEach(disposeModel));

describe("a model carries its tokenizer", () => {
  it("encodes as the folder's tokenizer does, and is not read by copying the model", () => {
    const model = load("fixtures/models/stories260k");
    expect(Object.keys(model)).not.toContain("tokenizer");
    const own = loadTokenizer("fixtures/models/stories260k")!;
    const text = "Once upon a time, Lily found a red ball.";
    expect(model.tokenizer!.encode(text)).toEqual(own.encode(text));
    expect(model.tokenizer).toBe(model.tokenizer); // read once
    expect(load("fixtures/models/llama-tiny-a").tokenizer).toBeNull();
  });

  it("margins(model, text pairs) in one call equal margins of the same pairs tokenized by hand", () => {
    const model = load("fixtures/models/stories260k");
    const text = [
      { prompt: "Tom saw a dog.", chosen: " He patted it gently.", rejected: " He kicked it." },
      { prompt: "The sun was warm.", chosen: " They played outside.", rejected: " They were angry." },
    ];
    const byHand = tokenizePairs(
      text.map((p, i) => ({ ...p, line: i + 1 })),
      loadTokenizer("fixtures/models/stories260k"),
      model.config.vocabSize,
    ).pairs;
    expect(Array.from(margins(model, text))).toEqual(Array.from(margins(model, byHand)));
    expect(() => margins(load("fixtures/models/llama-tiny-a"), text)).toThrow(/need a tokenizer/);
  });
});
