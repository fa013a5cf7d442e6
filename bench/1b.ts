// The paper's setting at full size: a Llama-3.2-1B-shaped BF16 pair (exact config, random weights, tuned = base +
// a rank-1 change in the two middle layers), the real Llama 3 tokenizer and real HH-RLHF pairs. For the native
// matmul and wasm's own kernels in the same run: the matmul ceiling, load time, peak RSS, forward tokens/s, seconds
// per pair of the full analysis by stage, and the hours a --limit 200 study takes at those rates; and — when a
// python3 with torch is on the machine — the same layer sweep in PyTorch (bench/peers/sweep.py) as a ratio, with
// its margins checked against ours.
//   npm run bench:1b [-- --layers 16 --pairs 2 --max-tokens 160 --batch N --workers N --dir DIR --kernels native,wasm]
// (the wasm run of the full analysis takes about half an hour on 2 cores: --kernels native leaves it out)
// (the run's own default batch unless --batch: one pair for streamed models, so with 2 pairs each worker scores one)
// The models (2 × 2.3 GiB) are written to DIR (default: the system temp folder) once and reused.
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { parseArgs } from "node:util";
import * as tf from "@tensorflow/tfjs-core";
import type { PairRecord } from "../src/analysis/schema.js";
import { loadModel } from "../src/io/model.js";
import { initBackend } from "../src/model/backend.js";
import { disposeModel, forward } from "../src/model/llama.js";
import { weightBudget } from "../src/study.js";
import { changedLayers, llama1bConfig, writeLlama1bShaped } from "./llama-1b-shaped.js";
import { layerFlops, layerForwardMs, matmulCeiling, oneLayerModel, sweepFlops } from "./lib.js";

const { values: a } = parseArgs({
  options: {
    layers: { type: "string", default: "16" },
    pairs: { type: "string", default: "2" },
    "max-tokens": { type: "string", default: "160" },
    workers: { type: "string" },
    batch: { type: "string" }, // default: what `prefprobe run` picks (1 pair per batch for streamed models)
    dir: { type: "string" },
    kernels: { type: "string", default: "native,wasm" },
    stage: { type: "string" }, // internal: run one measurement in a child process (its own peak RSS)
    backend: { type: "string" }, // internal: the child's backend
  },
});
const layers = Number(a.layers);
const nPairs = Number(a.pairs);
const maxTokens = Number(a["max-tokens"]);
const dir = a.dir ?? path.join(os.tmpdir(), `prefprobe-1b-${layers}`);
const HH = "fixtures/data/hh-rlhf/harmless-base-test.jsonl.gz";
const GiB = 2 ** 30;
const rssGiB = () => (process.resourceUsage().maxRSS * 1024) / GiB;
const models = { base: path.join(dir, "base"), tuned: path.join(dir, "tuned") };

/** Runs this file again with `--stage` on `backend`, in a fresh process, and returns the JSON it prints last. */
function child(stage: string, backend: string, extra: string[] = []): Record<string, unknown> {
  const args = [
    "--import",
    "tsx",
    process.argv[1]!,
    "--stage",
    stage,
    "--backend",
    backend,
    "--dir",
    dir,
    "--layers",
    a.layers!,
    "--pairs",
    a.pairs!,
    "--max-tokens",
    a["max-tokens"]!,
    ...(a.batch ? ["--batch", a.batch] : []),
    ...extra,
  ];
  const r = spawnSync(process.execPath, args, {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
    maxBuffer: 2 ** 28,
  });
  if (r.status !== 0) throw new Error(`bench stage ${stage} failed (exit ${r.status})`);
  return JSON.parse(r.stdout.trim().split("\n").at(-1)!);
}

/** Stage "load": both models loaded as `run` loads them, then one streamed forward of the base at 1 × 128 and 1 × 512. */
async function loadStage(): Promise<Record<string, unknown>> {
  const backend = await initBackend(a.backend);
  const perModel = weightBudget(backend) / 2;
  const t0 = performance.now();
  const base = await loadModel(models.base, { memoryBudget: perModel });
  const tuned = await loadModel(models.tuned, { memoryBudget: perModel });
  const loadS = (performance.now() - t0) / 1000;
  const tokensPerS: Record<string, number> = {};
  for (const T of [128, 512]) {
    const ids = [Array.from({ length: T }, (_, t) => 1000 + ((t * 7919) % 100000))];
    const t1 = performance.now();
    const r = forward(base, ids, { logitsAt: [[0, T - 1]] });
    r.logits!.dataSync();
    r.dispose();
    tokensPerS[T] = T / ((performance.now() - t1) / 1000);
  }
  disposeModel(base);
  disposeModel(tuned);
  return { backend, load_s: loadS, tokens_per_s: tokensPerS, peak_rss_gib: rssGiB() };
}

/**
 * Stage "run": `prefprobe run --limit pairs` with default settings; its timings and the process's peak RSS. It
 * runs the built library (dist/, which `npm run bench:1b` compiles first), as the `prefprobe` command does: from
 * src/ each worker thread would load tsx and compile the sources again, which costs memory a user never pays.
 */
async function runStage(out: string): Promise<Record<string, unknown>> {
  const built = new URL("../dist/src/study.js", import.meta.url);
  if (!fs.existsSync(built)) throw new Error("dist/ is missing: run `npm run bench:1b`, which compiles it first");
  const { runStudy } = (await import(built.href)) as typeof import("../src/study.js");
  const t0 = performance.now();
  let workers = 1;
  const r = await runStudy(
    {
      base: models.base,
      tuned: models.tuned,
      pairs: HH,
      out,
      force: true,
      limit: nPairs,
      maxTokens,
      workers: a.workers ? Number(a.workers) : undefined,
      backend: a.backend,
    },
    a.batch ? { batchPairs: Number(a.batch) } : {},
    {
      onInfo: (s) => (
        console.error(`  ${s}`),
        (workers = Number(/scoring on (\d+) worker threads/.exec(s)?.[1] ?? workers))
      ),
    },
  );
  return {
    wall_s: (performance.now() - t0) / 1000,
    timings_ms: r.results!.timings_ms,
    findings: r.findings,
    peak_rss_gib: rssGiB(),
    workers,
  };
}

/** A python3 that can import torch, if any. */
function findTorch(): string | null {
  for (const py of ["python3", "/usr/bin/python3"]) {
    const r = spawnSync(py, ["-c", "import torch; print(torch.__version__)"], { encoding: "utf8" });
    if (r.status === 0) return py;
  }
  return null;
}

if (a.stage === "load") console.log(JSON.stringify(await loadStage()));
else if (a.stage === "run") console.log(JSON.stringify(await runStage(`${a.dir!}-run-${a.backend}`)));
else await main();

/** One kernel's measurements: its matmul ceiling, one resident layer against it, the load stage and the full run. */
interface KernelRun {
  name: string;
  ceilings: number[]; // GFLOP/s at T = 128, 512, one thread
  allThreads: number; // GFLOP/s at T = 512 with every thread a call may use
  eff: string[];
  load: { load_s: number; tokens_per_s: Record<string, number>; peak_rss_gib: number; backend: string };
  run: { wall_s: number; timings_ms: Record<string, number>; peak_rss_gib: number; workers: number } | null;
}

async function main(): Promise<void> {
  const cfg = llama1bConfig(layers);
  const t0 = performance.now();
  writeLlama1bShaped(dir, layers);
  console.error(
    `models in ${dir} (${((performance.now() - t0) / 1000).toFixed(0)} s); tuned differs in layers ${changedLayers(layers).join(", ")}`,
  );

  const kernels = a.kernels!.split(",").map((k) => k.trim());
  const runs: KernelRun[] = [];
  for (const name of kernels) {
    // the kernel's matmul ceiling (one thread a call, as in a worker of a 2-worker run, and every thread) and one
    // resident layer's efficiency against it, measured in this process
    await initBackend(name, { threads: 1 });
    const layer = oneLayerModel(cfg);
    const eff: string[] = [];
    const ceilings: number[] = [];
    for (const T of [128, 512]) {
      const ceil = matmulCeiling(layer.layers[0]!, T);
      ceilings.push(ceil);
      const gflops =
        layerFlops(cfg, 1, T) / layerForwardMs(layer, 1, T, name === "native" ? "batched" : "grouped") / 1e6;
      eff.push(`T=${T}: ${(gflops / ceil).toFixed(2)} (${gflops.toFixed(1)} of ${ceil.toFixed(1)} GFLOP/s)`);
    }
    let allThreads = ceilings[1]!;
    if (name === "native") {
      await initBackend(name);
      allThreads = matmulCeiling(layer.layers[0]!, 512);
    }
    disposeModel(layer);
    tf.disposeVariables();
    console.error(`${name}: loading both models and one streamed forward (child process)…`);
    const load = child("load", name) as KernelRun["load"];
    console.error(`${name}: the full analysis on ${nPairs} pairs (child process)…`);
    const run = child("run", name, a.workers ? ["--workers", a.workers] : []) as KernelRun["run"];
    runs.push({ name, ceilings, allThreads, eff, load, run });
  }
  const first = runs[0]!;
  const runDir = `${dir}-run-${first.name}`;
  const records = fs
    .readFileSync(path.join(runDir, "pairs.jsonl"), "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as PairRecord);

  // the PyTorch peer on the same token ids
  const py = findTorch();
  let peer: { s: number; resumeS: number; maxErr: number; gflops: number; threads: number } | null = null;
  if (py) {
    console.error(`PyTorch peer (${py} bench/peers/sweep.py)…`);
    const sweep = (extra: string[]) => {
      const r = spawnSync(
        py,
        [
          "bench/peers/sweep.py",
          models.base,
          models.tuned,
          path.join(runDir, "pairs.jsonl"),
          "--count",
          String(nPairs),
          ...extra,
        ],
        { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] },
      );
      if (r.status !== 0) throw new Error("bench/peers/sweep.py failed");
      return r.stdout
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l));
    };
    const tl = sweep([]);
    const resume = sweep(["--resume-style"]);
    const lines = tl.filter((l) => "seconds" in l);
    let maxErr = 0;
    lines.forEach((l, i) => {
      const rec = records[i]!;
      const gain = (layer: number) => rec.gains[`tuned->base resid_post ${layer}`]!;
      const gap = Math.abs(rec.gap);
      maxErr = Math.max(maxErr, Math.abs(l.base - rec.margin.base) / gap, Math.abs(l.tuned - rec.margin.tuned) / gap);
      l.patched.forEach((m: number, k: number) => (maxErr = Math.max(maxErr, Math.abs(m - l.base - gain(k)) / gap)));
    });
    const mm = spawnSync(
      py,
      [
        "-c",
        "import torch,time\na=torch.randn(128,2048);b=torch.randn(2048,8192)\nfor _ in range(3): a@b\nt=time.time()\nfor _ in range(10): a@b\nprint(2*128*2048*8192*10/(time.time()-t)/1e9)",
      ],
      { encoding: "utf8" },
    );
    peer = {
      s: lines.reduce((s, l) => s + l.seconds, 0) / lines.length,
      resumeS: resume.filter((l) => "seconds" in l).reduce((s, l) => s + l.seconds, 0) / lines.length,
      maxErr,
      gflops: Number(mm.stdout),
      threads: tl.find((l) => "threads" in l)?.threads ?? 0,
    };
  }

  const cols = runs.map((r) => r.name);
  const row = (k: string, v: string) => console.log(`| ${k} | ${v} |${" |".repeat(cols.length - 1)}`); // one value for all
  console.log(
    `\n## bench:1b — ${layers} layers at Llama-3.2-1B width, ${os.availableParallelism()} cores, ${os.cpus()[0]?.model ?? "?"}\n`,
  );
  console.log(`| measure | ${cols.join(" | ")} |\n|---|${cols.map(() => "---").join("|")}|`);
  const each = (k: string, f: (r: KernelRun) => string) => console.log(`| ${k} | ${runs.map(f).join(" | ")} |`);
  const onDisk = Object.values(models)
    .flatMap((d) => fs.readdirSync(d).map((f) => fs.statSync(path.join(d, f)).size))
    .reduce((x, y) => x + y, 0);
  each("backend", (r) => r.load.backend);
  each("weights on disk (BF16, both models)", () => `${(onDisk / GiB).toFixed(2)} GiB`);
  each(
    "matmul ceiling, one thread ([T, 2048]·[2048, 8192] and the layer's other shapes)",
    (r) => `T=128: ${r.ceilings[0]!.toFixed(1)} GFLOP/s; T=512: ${r.ceilings[1]!.toFixed(1)}`,
  );
  each(
    `matmul, every thread a call may use (T=512, ${os.availableParallelism()} cores)`,
    (r) => `${r.allThreads.toFixed(1)} GFLOP/s`,
  );
  each("one resident layer vs the one-thread ceiling", (r) => r.eff.join("; "));
  each(
    "load both models (default budget)",
    (r) => `${r.load.load_s.toFixed(1)} s, peak RSS ${r.load.peak_rss_gib.toFixed(2)} GiB`,
  );
  each(
    "forward of the base model, 1 row",
    (r) => `T=128: ${r.load.tokens_per_s[128]!.toFixed(1)} tokens/s; T=512: ${r.load.tokens_per_s[512]!.toFixed(1)}`,
  );
  const batch = JSON.parse(fs.readFileSync(path.join(runDir, "manifest.json"), "utf8")).settings.batchPairs as number;
  const stageNames = ["scoring", "patch_sweep", "random_direction_control", "logit_lens", "distances", "pair_sums"];
  const perPair = (r: KernelRun) => r.run!.timings_ms.scoring_and_patching! / 1000 / nPairs;
  const ablation = (r: KernelRun) => (r.run!.timings_ms.mean_ablation ?? 0) / 1000 / nPairs;
  const testPairs = Math.max(1, Math.round(nPairs * 0.5));
  const lowRank = (r: KernelRun) => (r.run!.timings_ms.pca ?? 0) / 1000 / testPairs;
  each(
    `full analysis, ${nPairs} pairs, ${a.batch ? `default settings but --batch ${a.batch}` : `default settings (batches of ${batch})`}`,
    (r) =>
      `${r.run!.wall_s.toFixed(0)} s wall on ${r.run!.workers} worker thread(s); peak RSS ${r.run!.peak_rss_gib.toFixed(2)} GiB (the BF16 weights + ${(r.run!.peak_rss_gib - onDisk / GiB).toFixed(2)})`,
  );
  each("  per pair, per-pair stages (wall)", (r) => `${perPair(r).toFixed(1)} s`);
  each("  per-pair stages (thread s per pair)", (r) =>
    stageNames
      .filter((k) => r.run!.timings_ms[k])
      .map((k) => `${k} ${(r.run!.timings_ms[k]! / 1000 / nPairs).toFixed(1)}`)
      .join(", "),
  );
  each("  mean-ablation control per pair (wall)", (r) => `${ablation(r).toFixed(1)} s`);
  each(
    `  PCA + low-rank + steering per held-out pair (wall, ${testPairs} held out)`,
    (r) => `${lowRank(r).toFixed(1)} s`,
  );
  each("  LASSO and probes", (r) => `${((r.run!.timings_ms.lasso_and_probes ?? 0) / 1000).toFixed(1)} s`);
  // a --limit 200 study at these rates: per-pair stages and mean ablation for every pair, the low-rank stage for
  // the held-out half
  const hours = (r: KernelRun) => (200 * (perPair(r) + ablation(r)) + 100 * lowRank(r)) / 3600;
  each("--limit 200 study at these rates, every stage, default settings", (r) => `${hours(r).toFixed(1)} h`);
  if (runs.length > 1)
    row(
      "native / wasm, per pair (wall)",
      `${(perPair(runs[0]!) / perPair(runs[1]!)).toFixed(2)}; matmul ceiling ${(runs[0]!.ceilings[1]! / runs[1]!.ceilings[1]!).toFixed(1)}x at T=512`,
    );
  if (peer) {
    row(
      `PyTorch peer (TransformerLens-style sweep: a full forward per layer, ${peer.threads} threads)`,
      `${peer.s.toFixed(1)} s per pair; its matmul ${peer.gflops.toFixed(0)} GFLOP/s`,
    );
    row("PyTorch peer resuming each patched forward at the patched layer", `${peer.resumeS.toFixed(1)} s per pair`);
    // the peer's work per pair is prefprobe's scoring (both clean runs) and patch sweep; the random-direction
    // control and the logit lens are extra passes it does not make
    for (const r of runs) {
      const tm = r.run!.timings_ms;
      const same = (tm.scoring! + tm.patch_sweep!) / 1000 / nPairs;
      row(
        `${r.name} / TL-style peer per pair (targets: ≤ 0.5 on the peer's work, ≤ 1.0 all stages)`,
        `${(same / r.run!.workers / peer.s).toFixed(2)} on the peer's work (scoring + sweep, thread time ÷ ${r.run!.workers} worker thread(s)); ${(perPair(r) / peer.s).toFixed(2)} all per-pair stages with the controls and lens (wall)`,
      );
    }
    row("margins, prefprobe vs peer (max error / |gap|)", peer.maxErr.toExponential(1));
    const flops = records
      .map((rec) => sweepFlops(cfg, rec.tokens))
      .reduce((x, f) => ({ prefprobe: x.prefprobe + f.prefprobe / nPairs, peer: x.peer + f.peer / nPairs }), {
        prefprobe: 0,
        peer: 0,
      });
    row(
      "the peer's work in FLOPs, per pair",
      `prefprobe ${(flops.prefprobe / 1e12).toFixed(2)} TFLOP, the peer ${(flops.peer / 1e12).toFixed(2)} (${((100 * flops.prefprobe) / flops.peer).toFixed(0)}%)`,
    );
  } else row("PyTorch peer", "skipped: no python3 with torch (apt install python3-torch libopenblas0-pthread)");
  for (const r of runs) {
    console.log(
      `\n${r.name}: how long will my run take (pairs of ≤ ${maxTokens} tokens on this machine; time grows with length): about ` +
        `${perPair(r).toFixed(0)} s × pairs (per-pair stages) + ${ablation(r).toFixed(0)} s × pairs (mean-ablation control) + ` +
        `${lowRank(r).toFixed(0)} s × held-out pairs (low-rank and steering; half the pairs by default).`,
    );
  }
}
