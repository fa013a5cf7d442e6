// Bad input as a new user gives it: each case ends in a one-line error with a non-zero exit and no outputs,
// or in a counted skip or a warning — never in a wrong number.
import * as fs from "node:fs";
import * as path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { readSafetensors, writeSafetensors, type TensorToWrite } from "../src/io/safetensors.js";
import { expectClose, runCli, tmpDir } from "./helpers.js";

const MODEL = "fixtures/models/stories260k";
const TUNED = "fixtures/models/stories260k-dpo";
const FAST = ["--bootstrap", "100", "--stability", "2"];

function writePairs(lines: unknown[]): string {
  const f = path.join(tmpDir(), "pairs.jsonl");
  fs.writeFileSync(f, lines.map((l) => (typeof l === "string" ? l : JSON.stringify(l))).join("\n") + "\n");
  return f;
}
const good = (i: number) => ({
  prompt: `Once upon a time, Tom saw a cat number ${i}.`,
  chosen: " Tom gave the cat some milk.",
  rejected: " Tom ran away from the cat.",
});

/** A copy of the stories260k folder with `edit` applied to its tensors or files. */
function modelCopy(
  edit: (dir: string, tensors: Map<string, { dtype: string; shape: number[]; data: Float32Array }>) => void,
): string {
  const dir = path.join(tmpDir(), "model");
  fs.cpSync(MODEL, dir, { recursive: true });
  const tensors = readSafetensors(path.join(dir, "model.safetensors")) as unknown as Map<
    string,
    { dtype: string; shape: number[]; data: Float32Array }
  >;
  edit(dir, tensors);
  const out: Record<string, TensorToWrite> = {};
  for (const [name, t] of tensors) out[name] = { dtype: "F32", shape: t.shape, data: t.data };
  writeSafetensors(path.join(dir, "model.safetensors"), out);
  return dir;
}

/** The last stderr line, which must be the only error line. */
const lastLine = (err: string) => err.trim().split("\n").pop()!;

describe("bad input", () => {
  let pairs: string;
  beforeAll(() => (pairs = writePairs([good(0), good(1), good(2), good(3)])));

  it("NaN or Inf in the weights is refused, naming the tensor", () => {
    const bad = modelCopy((_d, t) => (t.get("model.layers.2.mlp.up_proj.weight")!.data[17] = NaN));
    const out = path.join(tmpDir(), "o");
    const r = runCli("run", "--base", MODEL, "--tuned", bad, "--pairs", pairs, "--out", out, ...FAST);
    expect(r.code).toBe(1);
    expect(lastLine(r.err)).toMatch(
      /^prefprobe: error: .*tensor "model\.layers\.2\.mlp\.up_proj\.weight" holds NaN at flat index 17: the weights are corrupt/,
    );
    expect(fs.existsSync(path.join(out, "results.json"))).toBe(false);
    const inf = modelCopy((_d, t) => (t.get("model.norm.weight")!.data[0] = -Infinity));
    expect(lastLine(runCli("logits", "--model", inf, "--ids", "1,2").err)).toMatch(
      /tensor "model\.norm\.weight" holds -Infinity/,
    );
  });

  it("pairs longer than the model's context are skipped and counted by default; --max-tokens past it warns", () => {
    const long = {
      prompt_ids: Array.from({ length: 600 }, (_, i) => 3 + (i % 400)),
      chosen_ids: [5],
      rejected_ids: [6],
    };
    const f = writePairs([good(0), long, good(1), good(2)]);
    const r = runCli(
      "run",
      "--base",
      MODEL,
      "--tuned",
      TUNED,
      "--pairs",
      f,
      "--out",
      path.join(tmpDir(), "o"),
      ...FAST,
    );
    expect(r.code, r.err).toBe(0);
    expect(r.err).toMatch(/pairs: 3 used, 1 skipped as longer than 512 tokens/);
    const w = runCli(
      "run",
      "--base",
      MODEL,
      "--tuned",
      TUNED,
      "--pairs",
      f,
      "--out",
      path.join(tmpDir(), "o"),
      "--max-tokens",
      "700",
      "--limit",
      "1",
      ...FAST,
    );
    expect(w.err).toMatch(
      /warning: --max-tokens 700 lets pairs run past the model's context \(max_position_embeddings 512\)/,
    );
  });

  it("a pair too large for one batch in the backend's memory is a one-line error with the numbers, before any compute", () => {
    const huge = {
      prompt_ids: Array.from({ length: 12000 }, (_, i) => 3 + (i % 400)),
      chosen_ids: [5],
      rejected_ids: [6],
    };
    const r = runCli(
      "run",
      "--base",
      MODEL,
      "--tuned",
      TUNED,
      "--pairs",
      writePairs([good(0), huge]),
      "--out",
      path.join(tmpDir(), "o"),
      "--max-tokens",
      "20000",
      ...FAST,
    );
    expect(r.code).toBe(1);
    expect(lastLine(r.err)).toMatch(
      /^prefprobe: error: pair at line 2 \(12001 tokens\) needs ~\d+\.\d\d GiB for one forward batch, more than the \d+\.\d\d GiB available/,
    );
    expect(r.err).not.toMatch(/scoring/);
  });

  it("--method attribution runs on streamed models (backpropagated a layer at a time) with the resident run's estimates; an unknown method is refused", () => {
    const out = path.join(tmpDir(), "o");
    const pairs = writePairs([good(0), good(1)]);
    const streamed = runCli(
      "run",
      "--base",
      MODEL,
      "--tuned",
      TUNED,
      "--pairs",
      pairs,
      "--out",
      out,
      "--method",
      "attribution",
      "--memory-budget",
      "0.001",
      ...FAST,
    );
    expect(streamed.code, streamed.err).toBe(0);
    expect(streamed.err).toMatch(/streamed/);
    const residentOut = path.join(tmpDir(), "r");
    const resident = runCli(
      "run",
      "--base",
      MODEL,
      "--tuned",
      TUNED,
      "--pairs",
      pairs,
      "--out",
      residentOut,
      "--method",
      "attribution",
      ...FAST,
    );
    expect(resident.code, resident.err).toBe(0);
    const est = (dir: string) =>
      fs
        .readFileSync(path.join(dir, "pairs.jsonl"), "utf8")
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l).attribution);
    expect(Object.keys(est(out)[0].gains)).toEqual([0, 1, 2, 3, 4].map((l) => `tuned->base resid_post ${l}`));
    // a streamed head's gradient sums its vocabulary chunks' products in another order: equal to float32 rounding
    expectClose(est(out), est(residentOut), "streamed vs resident estimates");
    const m = runCli(
      "run",
      "--base",
      MODEL,
      "--tuned",
      TUNED,
      "--pairs",
      writePairs([good(0)]),
      "--out",
      out,
      "--method",
      "gradient",
      ...FAST,
    );
    expect(m.code).toBe(1);
    expect(lastLine(m.err)).toMatch(
      /^prefprobe: error: option '--method <m>' argument 'gradient' is invalid. Allowed choices are exact, attribution, both\.$/,
    );
  });

  it("--resume of a run made by an older prefprobe (records by position, manifest/1) is refused in one line, its files kept", () => {
    const out = tmpDir();
    const manifest = JSON.stringify({ schema: "prefprobe.manifest/1" });
    fs.writeFileSync(path.join(out, "manifest.json"), manifest);
    const f = writePairs([good(0), good(1)]);
    const r = runCli("run", "--base", MODEL, "--tuned", TUNED, "--pairs", f, "--out", out, "--resume", ...FAST);
    expect(r.code).toBe(1);
    expect(r.err.trim().split("\n").at(-1)).toMatch(
      /^prefprobe: error: .* was made by an older prefprobe, whose records hold gains by position .*--force$/,
    );
    expect(fs.readFileSync(path.join(out, "manifest.json"), "utf8")).toBe(manifest);
  });

  it("a UTF-8 byte-order mark is read past; lines that are not valid UTF-8 are counted and said, not silently replaced", () => {
    const dir = tmpDir();
    const f = path.join(dir, "pairs.jsonl");
    const text = [good(0), good(1), good(2)].map((l) => JSON.stringify(l)).join("\n") + "\n";
    fs.writeFileSync(f, Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(text)]));
    const withBom = runCli(
      "run",
      "--base",
      MODEL,
      "--tuned",
      TUNED,
      "--pairs",
      f,
      "--out",
      path.join(dir, "a"),
      ...FAST,
    );
    expect(withBom.code, withBom.err).toBe(0);
    expect(withBom.err).not.toMatch(/UTF-8/);
    const bad = Buffer.from(text.replace("cat number 1", "cat number \u0001"));
    bad[bad.indexOf(0x01)] = 0xc3; // a lead byte with no continuation
    fs.writeFileSync(f, bad);
    const r = runCli("run", "--base", MODEL, "--tuned", TUNED, "--pairs", f, "--out", path.join(dir, "b"), ...FAST);
    expect(r.code, r.err).toBe(0);
    expect(r.err).toMatch(/warning: 1 pair comes from a line that is not valid UTF-8, read with U\+FFFD/);
    const results = JSON.parse(fs.readFileSync(path.join(dir, "b", "results.json"), "utf8"));
    expect(results.notes.invalid_utf8).toBe(1);
  });

  it("--alpha beyond ±100 and --window past the model's layers are refused before anything runs; --version prints the version", () => {
    for (const [args, msg] of [
      [["--alpha", "1e30"], /^prefprobe: error: --alpha must be a number in \[−100, 100\], got 1e\+30$/],
      [["--alpha", "1e308"], /^prefprobe: error: --alpha must be a number in \[−100, 100\]/],
      [["--window", "9"], /^prefprobe: error: --window is more than the model's 5 layers, got 9$/],
    ] as const) {
      const out = path.join(tmpDir(), "o");
      const r = runCli(
        "run",
        "--base",
        MODEL,
        "--tuned",
        TUNED,
        "--pairs",
        writePairs([good(0)]),
        "--out",
        out,
        ...args,
      );
      expect(r.code).toBe(1);
      expect(lastLine(r.err)).toMatch(msg);
      expect(fs.existsSync(out)).toBe(false);
    }
    const v = runCli("--version");
    expect(v.code).toBe(0);
    expect(v.out.trim()).toBe(JSON.parse(fs.readFileSync("package.json", "utf8")).version);
  });

  it("--limit N stops reading after N usable pairs (a bad line further on does not matter)", () => {
    const f = writePairs([good(0), good(1), good(2), "{not json"]);
    const r = runCli(
      "run",
      "--base",
      MODEL,
      "--tuned",
      TUNED,
      "--pairs",
      f,
      "--out",
      path.join(tmpDir(), "o"),
      "--limit",
      "3",
      ...FAST,
    );
    expect(r.code, r.err).toBe(0);
    expect(
      lastLine(
        runCli("run", "--base", MODEL, "--tuned", TUNED, "--pairs", f, "--out", path.join(tmpDir(), "o"), ...FAST).err,
      ),
    ).toMatch(/line 4: not valid JSON/);
  });

  it.each([
    ["repeated layers", ["--layers", "1,1,1"], /--layers lists layer 1 twice/],
    ["empty layers", ["--layers", ""], /--layers must be an integer ≥ 0, got ""/],
    ["unknown flag", ["--frobnicate"], /^prefprobe: error: unknown option '--frobnicate'$/],
    ["bad shard", ["--shard", "3"], /--shard must be i\/n/],
    ["resume and force", ["--resume", "--force"], /--resume and --force exclude each other/],
  ])("%s: one line, exit 1", (_n, extra, msg) => {
    const out = path.join(tmpDir(), "o");
    const r = runCli(
      "run",
      "--base",
      MODEL,
      "--tuned",
      TUNED,
      "--pairs",
      pairs,
      "--out",
      out,
      ...FAST,
      ...(extra as string[]),
    );
    expect(r.code).toBe(1);
    expect(r.err.trim().split("\n")).toHaveLength(1);
    expect(lastLine(r.err)).toMatch(msg as RegExp);
  });

  it("--folds larger than the pairs: the folds actually used are recorded; --bootstrap 0 prints no NaN", () => {
    const out = path.join(tmpDir(), "o");
    const r = runCli(
      "run",
      "--base",
      MODEL,
      "--tuned",
      TUNED,
      "--pairs",
      pairs,
      "--out",
      out,
      "--folds",
      "1000",
      "--bootstrap",
      "0",
      "--stability",
      "2",
    );
    expect(r.code, r.err).toBe(0);
    const res = JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8"));
    expect(res.settings.folds).toBe(1000);
    expect(res.cv.folds).toBe(4);
    expect(res.cv.fold_of_pair).toHaveLength(4);
    expect(res.lasso.folds).toBe(4);
    expect(r.out).not.toMatch(/NaN/);
    expect(r.out).toMatch(/^ +0 +-?\d\.\d{3} +-\.\.- /m); // no per-layer interval in the table
    expect(res.patching[0].recovery_ci).toEqual([null, null]);
  });

  it("identical responses and identical models are warned about", () => {
    const f = writePairs([good(0), { ...good(1), rejected: good(1).chosen }, good(2)]);
    const r = runCli(
      "run",
      "--base",
      MODEL,
      "--tuned",
      MODEL,
      "--pairs",
      f,
      "--out",
      path.join(tmpDir(), "o"),
      ...FAST,
    );
    expect(r.code, r.err).toBe(0);
    expect(r.err).toMatch(/warning: base and tuned are the same weights/);
    expect(r.err).toMatch(/warning: 1 pairs have identical chosen and rejected responses/);
  });

  it("five pairs whose rejected response is the chosen one: the findings say there is no gap, and localize nothing", () => {
    const f = writePairs([0, 1, 2, 3, 4].map((i) => ({ ...good(i), rejected: good(i).chosen })));
    const out = path.join(tmpDir(), "o");
    const r = runCli("run", "--base", MODEL, "--tuned", TUNED, "--pairs", f, "--out", out, ...FAST);
    expect(r.code, r.err).toBe(0);
    const words: string[] = JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8")).findings;
    expect(words[0]).toMatch(/^Verdict — is the tuned model better on these pairs\? No gap: .*float32 rounding/);
    expect(words.join(" ")).not.toMatch(/recovery peaks|patching only the top|LASSO \(|Steering|Logit lens/);
    // nor does the report chart the estimators' fits to rounding: it says why they are not drawn
    const html = fs.readFileSync(path.join(out, "report.html"), "utf8");
    expect(html).not.toMatch(/PCA spectrum|LASSO coefficients/);
    expect(html.match(/Not drawn: the two models&#39; margins differ by no more than float32 rounding/g)).toHaveLength(
      2,
    );
  });

  it("a tokenizer.json of an unknown model type is refused", () => {
    const dir = modelCopy((d) => {
      const tok = JSON.parse(fs.readFileSync(path.join(d, "tokenizer.json"), "utf8"));
      tok.model.type = "Sentencepiece9000";
      fs.writeFileSync(path.join(d, "tokenizer.json"), JSON.stringify(tok));
    });
    const r = runCli("logits", "--model", dir, "--text", "hi");
    expect(r.code).toBe(1);
    expect(lastLine(r.err)).toMatch(/tokenizer model type "Sentencepiece9000" is not one of BPE, WordPiece, Unigram/);
  });

  it("logits --out under a file, generate past the context, generate --ids", () => {
    const file = path.join(tmpDir(), "file.txt");
    fs.writeFileSync(file, "x");
    const r = runCli("logits", "--model", MODEL, "--ids", "1,2", "--out", path.join(file, "x.safetensors"));
    expect(r.code).toBe(1);
    expect(lastLine(r.err)).toMatch(/cannot write .*x\.safetensors: .*file\.txt is not a folder/);
    const g = runCli("generate", "--model", MODEL, "--steps", "5000");
    expect(g.code).toBe(1);
    expect(lastLine(g.err)).toMatch(
      /--steps 5000 after a 1-token prompt would run past the model's context of 512 tokens \(use at most --steps 511\)/,
    );
    const ids = runCli("generate", "--model", MODEL, "--ids", "1", "--steps", "8");
    const text = runCli("generate", "--model", MODEL, "--steps", "8");
    expect(ids.code, ids.err).toBe(0);
    expect(ids.out).toBe(text.out); // BOS as ids = the default start
  });
});
