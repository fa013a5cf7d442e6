// stories260K: the llama2.c conversion, llama2.c's exact greedy output, and the tokenizer.
import * as fs from "node:fs";
import * as path from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tempDir } from "./tempdirs.js";
import { convertLlama2c } from "../src/io/llama2c.js";
import { loadModelSync } from "../src/io/model.js";
import { loadTokenizer, type TextTokenizer } from "../src/io/tokenizer.js";
import { greedy } from "../src/model/generate.js";
import { disposeModel, type LlamaModel } from "../src/model/llama.js";
import { useBackend } from "./helpers.js";

useBackend();

const REF = "fixtures/reference/stories260K";
const DIR = "fixtures/models/stories260k";

/** llama2.c's encoder, written from its description: dummy " " prefix, code points (else bytes + 3), then
 * repeatedly merge the leftmost adjacent pair whose concatenation is the highest-scoring vocabulary piece. */
function llama2cEncode(text: string): number[] {
  const buf = fs.readFileSync(`${REF}/tok512.bin`);
  const pieces: string[] = [];
  const scores: number[] = [];
  let o = 4;
  for (let i = 0; i < 512; i++) {
    scores.push(buf.readFloatLE(o));
    const n = buf.readInt32LE(o + 4);
    pieces.push(buf.subarray(o + 8, o + 8 + n).toString("utf8"));
    o += 8 + n;
  }
  const lookup = new Map<string, number>();
  pieces.forEach((p, i) => {
    if (!lookup.has(p)) lookup.set(p, i);
  });
  const toks: number[] = [];
  if (text.length > 0) toks.push(lookup.get(" ")!);
  for (const ch of text) {
    const id = lookup.get(ch);
    if (id !== undefined) toks.push(id);
    else for (const byte of Buffer.from(ch, "utf8")) toks.push(byte + 3);
  }
  for (;;) {
    let best = -1e10;
    let at = -1;
    let bestId = -1;
    for (let i = 0; i + 1 < toks.length; i++) {
      const id = lookup.get(pieces[toks[i]!]! + pieces[toks[i + 1]!]!);
      if (id !== undefined && scores[id]! > best) {
        best = scores[id]!;
        at = i;
        bestId = id;
      }
    }
    if (at < 0) break;
    toks.splice(at, 2, bestId);
  }
  return toks;
}

let model: LlamaModel;
let tok: TextTokenizer;
beforeAll(() => {
  model = loadModelSync(DIR);
  tok = loadTokenizer(DIR)!;
});
afterAll(() => disposeModel(model));

describe("stories260K", () => {
  it("convert-llama2c reproduces the committed HF folder byte for byte", () => {
    const out = tempDir("conv");
    convertLlama2c(`${REF}/stories260K.bin`, `${REF}/tok512.bin`, out);
    for (const f of ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]) {
      expect(fs.readFileSync(path.join(out, f)).equals(fs.readFileSync(path.join(DIR, f))), f).toBe(true);
    }
    fs.rmSync(out, { recursive: true });
  });

  it("200 greedy steps from BOS reproduce llama2.c's output byte for byte", () => {
    const ids = greedy(model, [1], 200);
    expect(ids).toHaveLength(200);
    const text = tok.decode(ids);
    expect(text).toBe(fs.readFileSync(`${REF}/expected_greedy_200.txt`, "utf8"));
  });

  it("encodes like llama2.c (BOS first) and decodes back to the same text", () => {
    const sample = fs.readFileSync(`${REF}/expected_greedy_200.txt`, "utf8");
    const lines = [...sample.split("\n"), "Once upon a time", "  two spaces", "naïve café 中文 🙂", "a\tb\nc", "x"];
    for (const text of lines) {
      expect(tok.encode(text), text).toEqual([1, ...llama2cEncode(text)]);
      expect(tok.decode(tok.encode(text), { skipSpecialTokens: true })).toBe(text);
    }
    const chars = fc.constantFrom(..."abcdefghijklmnopqrstuvwxyz ABCLT.,!?'\"\n-é中🙂");
    fc.assert(
      fc.property(fc.string({ unit: chars, minLength: 1, maxLength: 60 }), (text) => {
        const ids = tok.encode(text);
        expect(ids.slice(1)).toEqual(llama2cEncode(text));
        expect(tok.decode(ids, { skipSpecialTokens: true })).toBe(text);
      }),
      { numRuns: 200 },
    );
  });

  it("the tokenizer reports that it adds BOS", () => {
    expect(tok.bosId).toBe(1);
    expect(tok.addsBos).toBe(true);
  });
});
