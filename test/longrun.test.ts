// Long runs: a run killed at a random point and resumed gives the results of an uninterrupted run; three
// shards merged give the results of one run; Ctrl-C stops cleanly; a run folder is never silently reused.
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { expectNear, expectSame, onNative, runCli, tmpDir } from "./helpers.js";

const CLI = path.resolve("dist/src/cli.js");
const BASE = "fixtures/models/stories260k";
const TUNED = "fixtures/models/stories260k-dpo";
const PAIRS = "fixtures/data/stories/test.jsonl";
// one thread unless a test says otherwise (the suite already runs two test files at once on two cores)
const ARGS = [
  "--base",
  BASE,
  "--tuned",
  TUNED,
  "--pairs",
  PAIRS,
  "--limit",
  "8",
  "--batch",
  "2",
  "--sites",
  "resid_post",
  "--bootstrap",
  "100",
  "--stability",
  "3",
  "--workers",
  "1",
];

/** results.json without what legitimately differs between two runs of the same thing (timings). */
function results(dir: string): Record<string, unknown> {
  const r = JSON.parse(fs.readFileSync(path.join(dir, "results.json"), "utf8"));
  delete r.timings_ms;
  delete r.total_ms;
  return r;
}

const lineCount = (f: string) => (fs.existsSync(f) ? fs.readFileSync(f, "utf8").split("\n").length - 1 : 0);

let reference: string;
let referenceErr: string;
beforeAll(() => {
  reference = path.join(tmpDir(), "ref");
  const r = runCli("run", ...ARGS, "--out", reference);
  if (r.code !== 0) throw new Error(r.err);
  referenceErr = r.err;
});

/** Starts a run; resolves with its exit code and stderr. `onRecords` is called once pairs.jsonl has `lines` lines. */
function startRun(
  out: string,
  lines: number,
  onRecords: (child: ReturnType<typeof spawn>) => void,
): Promise<{ code: number | null; err: string }> {
  const child = spawn(process.execPath, [CLI, "run", ...ARGS, "--out", out], { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  child.stderr!.on("data", (d) => (err += d));
  const log = path.join(out, "pairs.jsonl");
  const t = setInterval(() => lineCount(log) >= lines && (clearInterval(t), onRecords(child)), 5);
  return new Promise((resolve) => child.on("close", (code) => (clearInterval(t), resolve({ code, err }))));
}

describe("what a run prints", () => {
  it("no vega-lite warning: the report's charts, the steering chart's shared legend included, compile cleanly", () => {
    expect(results(reference).pca).toMatchObject({ steering: expect.arrayContaining([expect.anything()]) });
    expect(fs.readFileSync(path.join(reference, "report.html"), "utf8")).toContain("Steering the base model alone");
    expect(referenceErr).toMatch(/^scoring and patching \(8\)…$/m); // the stderr checked is the run's
    expect(referenceErr).not.toMatch(/WARN|Conflicting legend/);
  });

  it("a reader that goes away (| head) does not stop the run: it finishes and writes its outputs", async () => {
    const out = path.join(tmpDir(), "o");
    const child = spawn(process.execPath, [CLI, "run", ...ARGS, "--out", out], { stdio: ["ignore", "pipe", "pipe"] });
    let got = 0;
    const close = () => {
      got++;
      child.stdout!.destroy();
      child.stderr!.destroy();
    };
    child.stdout!.once("data", close);
    child.stderr!.once("data", close);
    const code = await new Promise((r) => child.on("exit", (c) => r(c)));
    expect(got).toBeGreaterThan(0); // the pipes were closed while it ran, not after
    expect(code).toBe(0);
    expect(fs.existsSync(path.join(out, "results.json"))).toBe(true);
    expect(fs.existsSync(path.join(out, "report.html"))).toBe(true);
    expect(fs.existsSync(path.join(out, "run.lock"))).toBe(false);
    expect(results(out)).toEqual(results(reference));
  });
});

describe("worker threads on streamed models", () => {
  it("two workers on streamed models (a tiny --memory-budget) use the main thread's stored bytes and write the one-thread resident run's pairs.jsonl, pairs.bin and results.json", () => {
    const out = path.join(tmpDir(), "o");
    const r = runCli("run", ...ARGS.slice(0, -2), "--out", out, "--workers", "2", "--memory-budget", "0.001");
    expect(r.code, r.err).toBe(0);
    expect(r.err).toMatch(/stories260k: streamed/);
    expect(r.err).toMatch(/scoring on 2 worker threads/);
    expect(r.err).toMatch(/mean-ablation control on 2 worker threads/);
    // byte for byte on wasm; on the native kernel streamed models are swept with their runs stacked, which moves
    // figures by float32 rounding (helpers' NATIVE_TOLERANCE)
    const bin = (dir: string) => new Float64Array(new Uint8Array(fs.readFileSync(path.join(dir, "pairs.bin"))).buffer);
    if (!onNative())
      expect(
        fs.readFileSync(path.join(out, "pairs.bin")).equals(fs.readFileSync(path.join(reference, "pairs.bin"))),
      ).toBe(true);
    expectSame(bin(out), bin(reference), "pairs.bin");
    const jsonl = (dir: string) =>
      fs
        .readFileSync(path.join(dir, "pairs.jsonl"), "utf8")
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l));
    if (!onNative())
      expect(fs.readFileSync(path.join(out, "pairs.jsonl"), "utf8")).toBe(
        fs.readFileSync(path.join(reference, "pairs.jsonl"), "utf8"),
      );
    expectSame(jsonl(out), jsonl(reference), "pairs.jsonl");
    expectSame(results(out), results(reference), "results.json");
  });
});

describe("the batch size of a streamed run", () => {
  const manifest = (dir: string) => JSON.parse(fs.readFileSync(path.join(dir, "manifest.json"), "utf8"));
  const records = (dir: string) =>
    fs
      .readFileSync(path.join(dir, "pairs.jsonl"), "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
  const noBatch = ARGS.filter((a, i) => a !== "--batch" && ARGS[i - 1] !== "--batch").concat(
    "--no-controls",
    "--limit",
    "4",
  );

  it("is one pair when a model is streamed and --batch is not given (said on stderr), with the resident run's margins and gains", () => {
    const out = path.join(tmpDir(), "s");
    const r = runCli("run", ...noBatch, "--out", out, "--memory-budget", "0.001");
    expect(r.code, r.err).toBe(0);
    expect(r.err).toMatch(/batches of 1 pair, as a model is streamed/);
    expect(manifest(out).settings.batchPairs).toBe(1);
    expect(manifest(out).batches).toEqual([
      [0, 1],
      [1, 2],
      [2, 3],
      [3, 4],
    ]);
    // the reference ran resident in batches of 2: a pair's numbers do not depend on its batch (to float32 rounding)
    const ref = records(reference).slice(0, 4);
    records(out).forEach((rec, i) => {
      expect(rec.ids).toEqual(ref[i].ids);
      for (const k of ["base", "tuned"]) expectNear(rec.margin[k], ref[i].margin[k], `margin ${k}`);
      expect(Object.keys(rec.gains).length).toBeGreaterThan(0);
      for (const [key, g] of Object.entries(rec.gains as Record<string, number>)) expectNear(g, ref[i].gains[key], key);
    });
  });

  it("is what --batch says on a streamed model, and the default 4 on resident ones", () => {
    const asked = path.join(tmpDir(), "a");
    const r = runCli("run", ...noBatch, "--out", asked, "--memory-budget", "0.001", "--batch", "3");
    expect(r.code, r.err).toBe(0);
    expect(r.err).not.toMatch(/batches of 1 pair/);
    expect(manifest(asked).batches).toEqual([
      [0, 3],
      [3, 4],
    ]);
    const resident = path.join(tmpDir(), "r");
    const q = runCli("run", ...noBatch, "--out", resident);
    expect(q.code, q.err).toBe(0);
    expect(q.err).not.toMatch(/streamed/);
    expect(manifest(resident).settings.batchPairs).toBe(4);
    expect(manifest(resident).batches).toEqual([[0, 4]]);
  });
});

describe("resume", () => {
  it("kill -9 at a random point, then --resume, gives the uninterrupted run's results.json", async () => {
    const out = path.join(tmpDir(), "o");
    const stopAt = 1 + Math.floor(Math.random() * 3); // after 1–3 of the 4 batches have been written
    const child = spawn(process.execPath, [CLI, "run", ...ARGS, "--out", out], { stdio: "ignore" });
    const log = path.join(out, "pairs.jsonl");
    await new Promise<void>((resolve, reject) => {
      const t = setInterval(() => {
        if (lineCount(log) >= 2 * stopAt) {
          clearInterval(t);
          child.kill("SIGKILL");
          resolve();
        }
      }, 5);
      child.on("exit", () => (clearInterval(t), reject(new Error("the run finished before it could be killed"))));
    });
    await new Promise((r) => child.on("exit", r));
    expect(fs.existsSync(path.join(out, "results.json"))).toBe(false);
    expect(fs.existsSync(path.join(out, "report.html"))).toBe(false);
    const before = lineCount(log);
    expect(before).toBeLessThan(14);
    // a run folder is not reused by accident
    const again = runCli("run", ...ARGS, "--out", out);
    expect(again.code).toBe(1);
    // the killed run's lock names it, and is taken over by --resume below
    expect(again.err).toMatch(
      /holds a run that was stopped \(pid \d+ on .*\): continue it with --resume or replace it with --force/,
    );
    const r = runCli("run", ...ARGS, "--out", out, "--resume");
    expect(r.code, r.err).toBe(0);
    expect(r.out).toMatch(/resumed: \d+ pairs from the earlier run/);
    expect(results(out)).toEqual(results(reference));
    expect(fs.readFileSync(path.join(out, "pairs.jsonl"), "utf8")).toBe(
      fs.readFileSync(path.join(reference, "pairs.jsonl"), "utf8"),
    );
    expect(
      fs.readFileSync(path.join(out, "pairs.bin")).equals(fs.readFileSync(path.join(reference, "pairs.bin"))),
    ).toBe(true);
  });

  it("a torn last line and a partial batch are dropped, then redone", () => {
    const out = path.join(tmpDir(), "o");
    fs.mkdirSync(out);
    for (const f of ["manifest.json", "pairs.jsonl", "pairs.bin"])
      fs.copyFileSync(path.join(reference, f), path.join(out, f));
    const lines = fs.readFileSync(path.join(out, "pairs.jsonl"), "utf8").split("\n");
    // keep 5 whole records (two whole batches and half of the third) and half of the sixth line
    fs.writeFileSync(path.join(out, "pairs.jsonl"), lines.slice(0, 5).join("\n") + "\n" + lines[5]!.slice(0, 40));
    const r = runCli("run", ...ARGS, "--out", out, "--resume");
    expect(r.code, r.err).toBe(0);
    expect(r.out).toMatch(/resumed: 4 pairs from the earlier run, 4 scored now/);
    expect(results(out)).toEqual(results(reference));
  });

  it("--resume with other inputs is refused, naming what differs", () => {
    const out = path.join(tmpDir(), "o");
    fs.mkdirSync(out);
    for (const f of ["manifest.json", "pairs.jsonl", "pairs.bin"])
      fs.copyFileSync(path.join(reference, f), path.join(out, f));
    const r = runCli("run", ...ARGS.map((a) => (a === "100" ? "101" : a)), "--seed", "4", "--out", out, "--resume");
    expect(r.code).toBe(1);
    expect(r.err.trim().split("\n").pop()).toMatch(
      /^prefprobe: error: --resume: the run in .* was made with other inputs: settings\.seed: 0 vs 4; settings\.bootstrap: 100 vs 101$/,
    );
    // a list that differs is told by its lengths and first difference, not cut off mid-way
    const batches = runCli("run", ...ARGS, "--batch", "1", "--out", out, "--resume");
    expect(batches.err.trim().split("\n").pop()).toMatch(
      /batches: \d+ vs \d+ entries, first different at \[\d+\]: \[\d+,\d+\] vs \[\d+,\d+\]/,
    );
    const empty = path.join(tmpDir(), "empty");
    const nothing = runCli("run", ...ARGS, "--out", empty, "--resume");
    expect(nothing.err).toMatch(/--resume: .* holds no run to continue/);
    expect(fs.existsSync(empty)).toBe(false); // the folder it made for nothing is gone
  });

  it("Ctrl-C stops between batches with a one-line message and exit 130; --resume finishes the run", async () => {
    const out = path.join(tmpDir(), "o");
    const child = spawn(process.execPath, [CLI, "run", ...ARGS.slice(0, -2), "--workers", "2", "--out", out], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    let err = "";
    child.stderr.on("data", (d) => (err += d));
    const log = path.join(out, "pairs.jsonl");
    const sent = setInterval(() => lineCount(log) >= 2 && (child.kill("SIGINT"), clearInterval(sent)), 5);
    const code = await new Promise((r) => child.on("exit", (c) => r(c)));
    clearInterval(sent);
    expect(code).toBe(130);
    expect(err).toMatch(/interrupted after (\d+) of 8 pairs; rerun with --resume/);
    const done = Number(/interrupted after (\d+)/.exec(err)![1]);
    expect(lineCount(log)).toBe(done);
    expect(fs.existsSync(path.join(out, "results.json"))).toBe(false);
    const r = runCli("run", ...ARGS, "--out", out, "--resume");
    expect(r.code, r.err).toBe(0);
    expect(results(out)).toEqual(results(reference));
  });
});

describe("SIGTERM (Slurm, Kubernetes)", () => {
  it("stops after the current batch as Ctrl-C does (exit 130, lock released); --resume gives the uninterrupted run's margins", async () => {
    const out = path.join(tmpDir(), "o");
    const r = await startRun(out, 2, (child) => child.kill("SIGTERM"));
    expect(r.code, r.err).toBe(130);
    expect(r.err).toMatch(/stopping after the current batch/);
    const done = Number(/interrupted after (\d+) of 8 pairs; rerun with --resume/.exec(r.err)?.[1]);
    expect(done).toBeGreaterThanOrEqual(2);
    expect(done).toBeLessThan(8);
    expect(lineCount(path.join(out, "pairs.jsonl"))).toBe(done); // the records of every finished batch, whole
    expect(fs.existsSync(path.join(out, "run.lock"))).toBe(false);
    expect(fs.existsSync(path.join(out, "results.json"))).toBe(false);
    const again = runCli("run", ...ARGS, "--out", out, "--resume");
    expect(again.code, again.err).toBe(0);
    expect(again.out).toMatch(new RegExp(`resumed: ${done} pairs from the earlier run`));
    const margins = (dir: string) => (results(dir).pairs as Array<{ margin: unknown }>).map((p) => p.margin);
    expect(margins(out)).toHaveLength(8);
    expect(margins(out)).toEqual(margins(reference));
    expect(results(out)).toEqual(results(reference));
  });
});

describe("shards", () => {
  it("three shards merged give the results of one run", () => {
    const dirs = [0, 1, 2].map((i) => {
      const d = path.join(tmpDir(), `shard${i}`);
      const r = runCli("run", ...ARGS, "--out", d, "--shard", `${i}/3`);
      expect(r.code, r.err).toBe(0);
      expect(r.out).toMatch(new RegExp(`shard ${i}/3: \\d+ pairs scored`));
      expect(fs.existsSync(path.join(d, "results.json"))).toBe(false);
      return d;
    });
    const out = path.join(tmpDir(), "merged");
    const missing = runCli("merge", out, dirs[0]!, dirs[2]!);
    expect(missing.err).toMatch(/missing shard 1\/3/);
    const r = runCli("merge", out, ...dirs.reverse());
    expect(r.code, r.err).toBe(0);
    expect(results(out)).toEqual(results(reference));
    expect(fs.readFileSync(path.join(out, "pairs.jsonl"), "utf8")).toBe(
      fs.readFileSync(path.join(reference, "pairs.jsonl"), "utf8"),
    );
  });

  it("merge refuses folders that are not shards of one run", () => {
    const a = path.join(tmpDir(), "a");
    const b = path.join(tmpDir(), "b");
    const few = [...ARGS, "--limit", "2"]; // what is checked is the refusal, not the numbers
    expect(runCli("run", ...few, "--out", a, "--shard", "0/2").code).toBe(0);
    expect(runCli("run", ...few, "--out", b, "--shard", "1/2", "--seed", "9").code).toBe(0);
    const r = runCli("merge", path.join(tmpDir(), "m"), a, b);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/is not a shard of the same run as .*: settings\.seed: 0 vs 9/);
    expect(runCli("run", ...ARGS, "--out", a, "--shard", "2/2").err).toMatch(/--shard must be i\/n with 0 ≤ i < n/);
  });
});

describe("output folder", () => {
  it("--out that cannot be created is refused at once, before any compute", () => {
    const t0 = Date.now();
    const r = runCli("run", ...ARGS, "--out", "/proc/prefprobe-test/x");
    expect(r.code).toBe(1);
    expect(r.err.trim()).toMatch(/^prefprobe: error: cannot write to --out \/proc\/prefprobe-test\/x \(\w+\)$/);
    expect(r.err).not.toMatch(/backend/); // nothing was started
    expect(Date.now() - t0).toBeLessThan(30_000);
  });
});
