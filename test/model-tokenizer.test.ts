// A loaded model carries its folder's tokenizer, read on first use: one call from text pairs to margins needs
// nothing else, and a folder without a tokenizer gives null (and text pairs a one-line error).
import { afterAll, describe, expect, it } from "vitest";
import { loadModelSync } from "../src/io/model.js";
import { loadTokenizer } from "../src/io/tokenizer.js";
import { margins } from "../src/io/margins.js";
import { PairsError, tokenizePairs } from "../src/io/pairs.js";
import { makeBatch } from "../src/data/batch.js";
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

  it("checks each pair as a pairs file's line is checked, naming pairs[i] and the field", () => {
    const model = load("fixtures/models/stories260k");
    const ok = { prompt: "Tom saw a dog.", chosen: " He patted it.", rejected: " He ran." };
    const cases: Array<[unknown, RegExp]> = [
      [
        { prompt: "Tom was sad.", chosen: " Sue hugged him." },
        /^pairs\[1\]: "rejected" is missing \(a pair needs strings "chosen" and "rejected", or promptIds\/chosenIds\/rejectedIds\)$/,
      ],
      [{ ...ok, prompt: 5 }, /^pairs\[1\]: "prompt" must be a string, got a number$/],
      [{ ...ok, chosen: null }, /^pairs\[1\]: "chosen" must be a string, got null \(a pair needs strings/],
      [
        { promptIds: [1, 2], chosenIds: [3.5], rejectedIds: [4] },
        /^pairs\[1\]: chosenIds must be an array of non-negative integers$/,
      ],
      [{ promptIds: [1, 2], chosenIds: [3] }, /^pairs\[1\]: rejectedIds must be an array of non-negative integers$/],
      [{ chosen: "a", rejected: "b" }, /^pairs\[1\]: chosen and rejected share no prefix ending in "\\n\\nAssistant:"/],
      ["Tom saw a dog.", /^pairs\[1\]: not an object$/],
      [null, /^pairs\[1\]: not an object$/],
    ];
    for (const [bad, msg] of cases) {
      let e: unknown;
      try {
        margins(model, [ok, bad as typeof ok]);
      } catch (x) {
        e = x;
      }
      expect(e, JSON.stringify(bad)).toBeInstanceOf(PairsError);
      expect((e as Error).message, JSON.stringify(bad)).toMatch(msg);
    }
  });

  it("an HH-RLHF record without a prompt is split at its last Assistant turn, as a pairs file's is", () => {
    const model = load("fixtures/models/stories260k");
    const hh = {
      chosen: "\n\nHuman: Hi.\n\nAssistant: Hello, friend.",
      rejected: "\n\nHuman: Hi.\n\nAssistant: Go away.",
    };
    const split = { prompt: "\n\nHuman: Hi.\n\nAssistant:", chosen: " Hello, friend.", rejected: " Go away." };
    const got = margins(model, [hh]);
    expect(Number.isFinite(got[0])).toBe(true);
    expect(Array.from(got)).toEqual(Array.from(margins(model, [split])));
  });

  it("a pair longer than the model's context is an error naming its length and the context, text or tokenized", () => {
    const model = load("fixtures/models/stories260k");
    expect(model.config.maxPositionEmbeddings).toBe(512);
    const long = { prompt: "Once upon a time, ".repeat(120), chosen: " They played.", rejected: " They cried." };
    const msg =
      /^pairs\[0\]: (\d+) tokens \(prompt and the longer response\), longer than the model's context \(max_position_embeddings 512\)$/;
    expect(() => margins(model, [long])).toThrow(msg);
    const [tokenized] = tokenizePairs([{ ...long, line: 1 }], model.tokenizer!, model.config.vocabSize).pairs;
    const n = tokenized!.promptIds.length + Math.max(tokenized!.chosenIds.length, tokenized!.rejectedIds.length);
    expect(n).toBeGreaterThan(512);
    expect(() => margins(model, [tokenized!])).toThrow(new RegExp(`^pairs\\[0\\]: ${n} tokens`));
    expect(() => margins(model, makeBatch([tokenized!]))).toThrow(msg);
    // at the context exactly, it is scored
    const fits = { ...tokenized!, promptIds: tokenized!.promptIds.slice(0, 512 - tokenized!.chosenIds.length) };
    fits.rejectedIds = fits.rejectedIds.slice(0, fits.chosenIds.length);
    expect(fits.promptIds.length + Math.max(fits.chosenIds.length, fits.rejectedIds.length)).toBe(512);
    expect(Number.isFinite(margins(model, [fits])[0])).toBe(true);
  });
});
