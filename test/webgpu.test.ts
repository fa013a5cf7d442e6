// The webgpu backend (Dawn's Node bindings under @tensorflow/tfjs-backend-webgpu) on a software adapter, as CI has
// no GPU: Mesa's llvmpipe through Dawn's OpenGL ES backend (PREFPROBE_WEBGPU=software; a machine without Mesa's
// EGL and GLES fails here, loudly; PREFPROBE_WEBGPU=hardware runs the file on a real GPU instead). Checks the
// synchronous read back, adapter choice and its errors, the forward pass against the float64 oracle, a head split
// under the GPU's buffer limit, the planted analysis, and a CLI run killed and resumed, against wasm's numbers.
import { spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import fc from "fast-check";
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backendKind, initBackend, maxTensorBytes } from "../src/model/backend.js";
import {
  adapterLabel,
  dawnMissing,
  isSoftwareAdapter,
  spinUntil,
  type AdapterChoice,
  type AdapterFacts,
} from "../src/model/webgpu.js";
import { loadModelSync, ModelError } from "../src/io/model.js";
import { StreamedWeights } from "../src/io/stream.js";
import { loadTokenizer } from "../src/io/tokenizer.js";
import { tokenizePairs } from "../src/io/pairs.js";
import { disposeModel, forward, type LlamaModel } from "../src/model/llama.js";
import { runAnalysis } from "../src/analysis/run.js";
import { DEFAULT_SETTINGS } from "../src/analysis/settings.js";
import type { OracleConfig } from "./oracle.js";
import { arbCase } from "./random-model.js";
import { checkAgainstOracle } from "./oracle-check.js";
import { DEMO, expectClose, maxAbsDiff, runCli, tmpDir } from "./helpers.js";

const ADAPTER = (process.env.PREFPROBE_WEBGPU || "software") as AdapterChoice;
const CLI = path.resolve("dist/src/cli.js");
/** A CLI child's environment: the adapter this file runs on, no backend forced. */
const childEnv = (extra: Record<string, string> = {}) => {
  const env: Record<string, string | undefined> = { ...process.env, PREFPROBE_WEBGPU: ADAPTER, ...extra };
  delete env.PREFPROBE_BACKEND;
  return env as NodeJS.ProcessEnv;
};
const cli = (args: string[], extra: Record<string, string> = {}) => {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", env: childEnv(extra) });
  return { code: r.status, out: r.stdout, err: r.stderr };
};
/** Environment that leaves Dawn no adapter: Vulkan's drivers and Mesa's EGL pointed at nothing. */
const NO_VULKAN = { VK_DRIVER_FILES: "/nonexistent.json", VK_ICD_FILENAMES: "/nonexistent.json" };
const NO_EGL = { EGL_PLATFORM: "nonexistent", __EGL_VENDOR_LIBRARY_FILENAMES: "/nonexistent.json" };

let description: string;
beforeAll(async () => {
  description = await initBackend("webgpu", { webgpuAdapter: ADAPTER });
}, 60_000);

describe("adapters", () => {
  it("starts on the adapter asked for and names it", () => {
    expect(backendKind()).toBe("webgpu");
    expect(tf.getBackend()).toBe("webgpu");
    expect(description).toMatch(/^webgpu \(.+\)$/);
    if (/llvmpipe/.test(description)) expect(description).toMatch(/, software\)$/);
    expect(maxTensorBytes()).toBeGreaterThan(0);
    expect(maxTensorBytes()).toBeLessThan(Infinity);
  });

  it("software renderers are told by their names or the fallback flag; hardware GPUs are not", () => {
    const software: AdapterFacts[] = [
      // what Dawn reports for Mesa's llvmpipe through OpenGL ES, and lavapipe through Vulkan
      {
        vendor: "",
        architecture: "",
        device: "llvmpipe-llvm-15-0-6-256-bits-",
        description: "OpenGL version OpenGL ES 3.2 Mesa 22.3.6",
      },
      { vendor: "mesa", architecture: "", device: "llvmpipe (LLVM 19.1.7, 256 bits)", description: "Mesa 25.0.7" },
      { vendor: "google", architecture: "", device: "SwiftShader Device (Subzero)", description: "SwiftShader driver" },
      { vendor: "microsoft", architecture: "", device: "", description: "Microsoft Basic Render Driver" },
      { vendor: "mesa", device: "softpipe", description: "" },
      { vendor: "nvidia", device: "NVIDIA GeForce RTX 4090", isFallbackAdapter: true },
    ];
    const hardware: AdapterFacts[] = [
      {
        vendor: "nvidia",
        architecture: "ada-lovelace",
        device: "NVIDIA GeForce RTX 4090",
        description: "NVIDIA: 550.54.14",
      },
      { vendor: "nvidia", architecture: "hopper", device: "NVIDIA H200", description: "NVIDIA: 560.35.03" },
      { vendor: "apple", architecture: "metal-3", device: "", description: "Apple M2 Pro" },
      {
        vendor: "amd",
        architecture: "rdna-3",
        device: "AMD Radeon RX 7900 XTX (RADV NAVI31)",
        description: "radv Mesa 24.0.5",
      },
      {
        vendor: "intel",
        architecture: "gen-12lp",
        device: "Intel(R) UHD Graphics 770 (ADL-S GT1)",
        description: "Intel open-source Mesa driver: Mesa 23.2.1",
      },
    ];
    for (const a of software) expect(isSoftwareAdapter(a), JSON.stringify(a)).toBe(true);
    for (const a of hardware) expect(isSoftwareAdapter(a), JSON.stringify(a)).toBe(false);
    expect(adapterLabel(software[0]!)).toBe("llvmpipe-llvm-15-0-6-256-bits, OpenGL ES 3.2 Mesa 22.3.6, software");
    expect(adapterLabel(hardware[2]!)).toBe("apple metal-3, Apple M2 Pro");
    expect(adapterLabel({})).toBe("an unnamed adapter");
  });

  it("auto-detection never takes a software adapter: with llvmpipe the only one left, a plain run picks native or wasm, and Dawn's probing prints nothing", () => {
    // on Linux Vulkan's drivers are hidden, so a software adapter is all Dawn could offer, even with
    // PREFPROBE_WEBGPU=software in the environment (which only an asked-for webgpu backend reads)
    const hide = process.platform === "linux" ? NO_VULKAN : {};
    const r = cli(["logits", "--model", DEMO.base, "--ids", "1,5,9"], { ...hide, PREFPROBE_WEBGPU: "software" });
    expect(r.code, r.err).toBe(0);
    const first = r.err.split("\n")[0]!;
    expect(first).toMatch(/^backend: /);
    expect(first).not.toMatch(/software\)|llvmpipe|lavapipe|SwiftShader/);
    if (process.platform === "linux") expect(first).toMatch(/^backend: (native|wasm) /);
    expect(r.err).not.toMatch(/Warning|Vulkan|EGL/);
    // asked for without PREFPROBE_WEBGPU=software there, webgpu is a one-line error that says how to allow one
    if (process.platform === "linux") {
      const asked = cli(["logits", "--model", DEMO.base, "--ids", "1", "--backend", "webgpu"], {
        ...NO_VULKAN,
        PREFPROBE_WEBGPU: "hardware",
      });
      expect(asked.code).toBe(1);
      expect(asked.err.trim().split("\n")).toHaveLength(1);
      expect(asked.err).toMatch(
        /^prefprobe: error: backend "webgpu" is not available: Dawn found no GPU adapter \(through Vulkan\); PREFPROBE_WEBGPU=software takes a software adapter/,
      );
    }
  });

  it.skipIf(ADAPTER !== "software")(
    "asked for where Mesa's EGL finds no display: a one-line error naming the packages; a bad PREFPROBE_WEBGPU is one too (software runs only)",
    () => {
      const r = cli(["logits", "--model", DEMO.base, "--ids", "1", "--backend", "webgpu"], NO_EGL);
      expect(r.code).toBe(1);
      expect(r.err.trim().split("\n")).toHaveLength(1);
      expect(r.err.trim()).toMatch(
        /^prefprobe: error: backend "webgpu" is not available: Dawn found no OpenGL ES adapter: Mesa's EGL and GLES drivers are needed \(on Debian\/Ubuntu: apt-get install libegl1 libegl-mesa0 libgles2 libgl1-mesa-dri\)$/,
      );
      const bad = cli(["logits", "--model", DEMO.base, "--ids", "1", "--backend", "webgpu"], {
        PREFPROBE_WEBGPU: "gpu",
      });
      expect(bad.code).toBe(1);
      expect(bad.err.trim()).toBe('prefprobe: error: unknown PREFPROBE_WEBGPU "gpu" (choose hardware or software)');
    },
  );

  it("without the event-loop addon webgpu is a one-line error that says how to build it, and auto-detection does not probe", () => {
    // a copy of the package with the native sources but not their build, sharing node_modules
    const dir = tmpDir();
    for (const f of ["package.json", "dist", "native/binding.gyp", "native/blas.c", "native/loop.c"]) {
      fs.mkdirSync(path.dirname(path.join(dir, f)), { recursive: true });
      fs.cpSync(f, path.join(dir, f), { recursive: true, filter: (src) => !src.includes(`native${path.sep}build`) });
    }
    fs.symlinkSync(path.resolve("node_modules"), path.join(dir, "node_modules"));
    const run = (args: string[]) =>
      spawnSync(process.execPath, [path.join(dir, "dist/src/cli.js"), ...args], { encoding: "utf8", env: childEnv() });
    const r = run(["logits", "--model", path.resolve(DEMO.base), "--ids", "1", "--backend", "webgpu"]);
    expect(r.status).toBe(1);
    expect(r.stderr.trim().split("\n")).toHaveLength(1);
    expect(r.stderr.trim()).toMatch(
      /^prefprobe: error: backend "webgpu" is not available: its event-loop addon \(native\/build\/Release\/prefprobe_loop.node\) is missing: it has not been built; npm run build:native builds it with the system's compiler \(gcc or clang\)$/,
    );
    const auto = run(["logits", "--model", path.resolve(DEMO.base), "--ids", "1"]);
    expect(auto.status, auto.stderr).toBe(0);
    expect(auto.stderr).toMatch(/^backend: wasm/);
    expect(auto.stderr).not.toMatch(/Warning|Vulkan|EGL/);
  });

  it("Dawn's bindings missing or without a binary for the platform: one line saying which", () => {
    const notInstalled = Object.assign(new Error("Cannot find package 'webgpu' imported from /x/webgpu.js"), {
      code: "ERR_MODULE_NOT_FOUND",
    });
    expect(dawnMissing(notInstalled)).toBe(
      "the npm package webgpu is not installed (an optional dependency: npm ci installs it unless --omit=optional)",
    );
    const noBinary = new Error(
      "Cannot find module '/x/node_modules/webgpu/dist/freebsd-x64/dawn.node'\nRequire stack:",
    );
    expect(dawnMissing(noBinary)).toBe(
      `webgpu is not available on this platform (${process.platform}-${process.arch}): Cannot find module '/x/node_modules/webgpu/dist/freebsd-x64/dawn.node'`,
    );
  });
});

describe("reading tensors back", () => {
  // small tensors whose values are on the CPU would otherwise run on tfjs's CPU kernels, never reaching the GPU
  beforeAll(() => void tf.env().set("WEBGPU_CPU_FORWARD", false));
  afterAll(() => void tf.env().set("WEBGPU_CPU_FORWARD", true));

  const SHAPES = [[], [1], [3], [7, 13], [2, 3, 5, 7], [0], [4, 0, 2], [1000, 1001]];

  it("float32, int32 and bool tensors of every shape come back bit for bit from GPU buffers, by dataSync, arraySync and data()", async () => {
    for (const shape of SHAPES) {
      const n = shape.reduce((a, b) => a * b, 1);
      const special = [NaN, Infinity, -Infinity, -0, 1e-40, 3.4e38];
      const f = Float32Array.from({ length: n }, (_, i) => special[i % 9] ?? Math.sin(i) * 1e3);
      const i32 = Int32Array.from(
        { length: n },
        (_, i) => [2 ** 31 - 1, -(2 ** 31), 16777217][i % 5] ?? i * 7919 - 50000,
      );
      const b = Uint8Array.from({ length: n }, (_, i) => ((i * 7) % 3 === 0 ? 1 : 0));
      const want = [f, i32, b];
      const sync = [tf.tensor(f, shape), tf.tensor(i32, shape, "int32"), tf.tensor(b, shape, "bool")];
      const async = [tf.tensor(f, shape), tf.tensor(i32, shape, "int32"), tf.tensor(b, shape, "bool")];
      // a kernel that reads them moves their values into GPU buffers (and drops the CPU copy)
      tf.dispose([...sync, ...async].map((t) => (t.dtype === "bool" ? tf.logicalNot(t) : tf.neg(t))));
      const bits = (v: ArrayLike<number> & { buffer?: ArrayBufferLike }) =>
        v instanceof Float32Array ? Array.from(new Uint32Array(v.buffer, v.byteOffset, v.length)) : Array.from(v);
      for (const [k, t] of sync.entries()) {
        const got = t.dataSync();
        expect(got.constructor, `${t.dtype} [${shape}]`).toBe(want[k]!.constructor);
        expect(bits(got), `${t.dtype} [${shape}]`).toEqual(bits(want[k]!));
      }
      for (const [k, t] of async.entries())
        expect(bits(await t.data()), `${t.dtype} [${shape}] async`).toEqual(bits(want[k]!));
      if (shape.length === 2 && n)
        expect((sync[1]!.arraySync() as number[][])[shape[0]! - 1]![shape[1]! - 1]).toBe(i32[n - 1]);
      tf.dispose([...sync, ...async]);
    }
  });

  it("kernels' outputs read back: float32 exact, int32 exact below 2^24 (tfjs's webgpu kernels compute int32 through float32)", () => {
    const f = Float32Array.from({ length: 5000 }, (_, i) => Math.sin(i) * 1e3);
    const i32 = Int32Array.from({ length: 5000 }, (_, i) => ((i * 7919) % 2 ** 24) - 2 ** 23);
    const outs = [tf.mul(tf.tensor(f), 1), tf.mul(tf.tensor(i32, [5000], "int32"), tf.scalar(1, "int32"))];
    expect(Array.from(outs[0]!.dataSync())).toEqual(Array.from(f));
    expect(outs[1]!.dtype).toBe("int32");
    expect(Array.from(outs[1]!.dataSync())).toEqual(Array.from(i32));
    tf.dispose(outs);
  });

  it("NaN comes back as NaN, and a 32 MiB result whole", () => {
    const nan = tf.mul(tf.tensor([NaN, 1, NaN]), 1);
    expect(Array.from(nan.dataSync())).toEqual([NaN, 1, NaN]);
    const big = tf.add(tf.fill([2048, 4096], 0.5), tf.reshape(tf.range(0, 4096), [1, 4096]));
    const v = big.dataSync();
    expect(v.length).toBe(2048 * 4096);
    expect([v[0], v[4095], v[4096], v[v.length - 1]]).toEqual([0.5, 4095.5, 0.5, 4095.5]);
    tf.dispose([nan, big]);
  });

  it("after the GPU reports an error the next read throws one line instead of returning numbers, and the one after reads again", () => {
    const device = (tf.backend() as unknown as { device: { createBuffer(d: object): { destroy(): void } } }).device;
    const usage = (globalThis as unknown as { GPUBufferUsage: { STORAGE: number } }).GPUBufferUsage;
    device.createBuffer({ size: 2 ** 45, usage: usage.STORAGE }); // beyond maxBufferSize: a validation error
    const y = tf.mul(tf.tensor([1, 2, 3]), 2);
    expect(() => y.dataSync()).toThrow(
      /^webgpu: the GPU reported an error, so the numbers read back cannot be trusted: .*Buffer size .* exceeds the max buffer size limit/,
    );
    const z = tf.mul(tf.tensor([1, 2, 3]), 2);
    expect(Array.from(z.dataSync())).toEqual([2, 4, 6]);
    tf.dispose([y, z]);
  });

  it.skipIf(ADAPTER !== "software")(
    "a kernel on a buffer over llvmpipe's 128 MiB binding limit is a GPU error, and its read throws it (software runs only)",
    () => {
      expect(maxTensorBytes()).toBe(2 ** 27);
      const y = tf.add(tf.fill([2 ** 25 + 1024], 1), 1);
      expect(() => y.dataSync()).toThrow(
        /^webgpu: the GPU reported an error, so the numbers read back cannot be trusted: Binding size \(134221824\) .* is larger than the maximum storage buffer binding size \(134217728\)\.$/,
      );
      y.dispose();
    },
  );

  it("a wait that never ends gives up after its limit, naming what it waited for", () => {
    expect(() => spinUntil({ runOnce: () => 0 }, () => false, 20, "reading a [3] float32 tensor back")).toThrow(
      /^webgpu: reading a \[3\] float32 tensor back did not finish within 0 s: the GPU does not answer$/,
    );
  });
});

describe("the model on webgpu", () => {
  it("matches the float64 oracle on random configs (logits and every site, both attention paths)", () => {
    fc.assert(
      fc.property(arbCase, ({ cfg, seed, dtype, shards, rows }) => checkAgainstOracle(cfg, seed, dtype, shards, rows)),
      { numRuns: 24, seed: 20261204 },
    );
    fc.assert(
      fc.property(arbCase, ({ cfg, seed, dtype, shards, rows }) =>
        checkAgainstOracle(cfg, seed, dtype, shards, rows, "grouped"),
      ),
      { numRuns: 8, seed: 20261205 },
    );
  });

  it("a 135 MB tied head, over llvmpipe's 128 MiB binding limit, goes in chunks and matches the float64 oracle", () => {
    // 33000 × 1024 float32: kept whole, llvmpipe's first kernel on it would fail (and the read throw, as the test
    // above shows); on a GPU whose limit is larger the model is simply resident
    const cfg: OracleConfig = {
      hidden: 1024,
      inter: 16,
      layers: 1,
      heads: 2,
      kvHeads: 1,
      headDim: 8,
      vocab: 33000,
      eps: 1e-5,
      theta: 10000,
      rope: { kind: "default" },
      tied: true,
      attnBias: false,
      mlpBias: false,
    };
    checkAgainstOracle(cfg, 3, "BF16", 1, [[1, 500, 32999, 7, 12000, 4]]);
  });

  it("a head larger than one GPU buffer may be goes in vocabulary chunks under the limit, with the resident model's logits and log-probabilities", () => {
    const resident = loadModelSync(DEMO.base);
    expect(resident.source).toBeUndefined(); // 0.5 MiB fits a buffer
    const H = resident.config.hiddenSize;
    const limit = 4 * H * 200; // 200 vocabulary rows of 512 a tensor; a layer's largest matrix, 64 × 172, fits
    const split = loadModelSync(DEMO.base, { tensorLimit: limit });
    try {
      const src = split.source as StreamedWeights;
      expect(src).toBeInstanceOf(StreamedWeights);
      expect(src.headChunks).toBeGreaterThanOrEqual(Math.ceil(resident.config.vocabSize / 200));
      for (let c = 0; c < src.headChunks!; c++) expect(src.headChunk(c).size * 4).toBeLessThanOrEqual(limit);
      const ids = [[1, 403, 407, 261, 378, 50, 9, 44]];
      const at = ids[0]!.map((_, t) => [0, t] as [number, number]);
      const targets = [...ids[0]!.slice(1), 2];
      for (const opts of [{}, { logitsAt: at, targets }]) {
        const a = forward(resident, ids, opts);
        const b = forward(split, ids, opts);
        if (a.logits) expect(maxAbsDiff(a.logits.dataSync(), b.logits!.dataSync())).toBeLessThanOrEqual(1e-5);
        else expect(maxAbsDiff(a.logprobs!, b.logprobs!)).toBeLessThanOrEqual(1e-5);
        a.dispose();
        b.dispose();
      }
      // a layer's matrices are never split: a limit below the largest is refused
      expect(() => loadModelSync(DEMO.base, { tensorLimit: 4 * H * 100 })).toThrow(ModelError);
      expect(() => loadModelSync(DEMO.base, { tensorLimit: 4 * H * 100 })).toThrow(
        /a layer's largest matrix takes 0.04 MiB as float32, more than one tensor may take on this backend/,
      );
    } finally {
      disposeModel(resident);
      disposeModel(split);
    }
  });

  it("the planted rank-2 change: gains 0 before its layer and the whole gap from it on, PCA rank 2, LASSO silent before it", async () => {
    const K = 2;
    const base = loadModelSync(DEMO.base);
    const [I, H] = base.layers[K]!.down.shape;
    const delta = tf.tidy(() =>
      tf.addN(
        [0, 1].map((i) =>
          tf.mul(
            tf.matMul(
              tf.tensor2d(
                Array.from({ length: I }, (_, j) => Math.cos(0.7 * j + i)),
                [I, 1],
              ),
              tf.tensor2d(
                Array.from({ length: H }, (_, j) => Math.sin(1.3 * j + 2 * i)),
                [1, H],
              ),
            ),
            0.4 / (i + 1),
          ),
        ),
      ),
    );
    const down = tf.add(base.layers[K]!.down, delta) as tf.Tensor2D;
    delta.dispose();
    const tuned: LlamaModel = { ...base, layers: base.layers.map((p, l) => (l === K ? { ...p, down } : p)) };
    const names = ["Lily", "Tom", "Ben", "Mia"];
    const raw = names.map((n, i) => ({
      line: i + 1,
      prompt: `Once upon a time, ${n} saw a little dog.`,
      chosen: `${n} smiled and said hello.`,
      rejected: `${n} was angry and went home.`,
    }));
    const pairs = tokenizePairs(raw, loadTokenizer(DEMO.base)!, base.config.vocabSize).pairs;
    try {
      const res = await runAnalysis(base, tuned, pairs, {
        ...DEFAULT_SETTINGS,
        bootstrap: 100,
        stabilityReps: 2,
        folds: 2,
        batchPairs: 2,
        controls: false,
      });
      const gaps = res.pairs.map((p) => p.gap);
      expect(Math.min(...gaps.map(Math.abs))).toBeGreaterThan(1e-3);
      for (const e of res.patching)
        e.gains.forEach((g, i) => {
          if (e.layer < K) expect(Math.abs(g), `layer ${e.layer} pair ${i}`).toBeLessThanOrEqual(1e-4);
          else expect(Math.abs(g - gaps[i]!), `layer ${e.layer} pair ${i}`).toBeLessThanOrEqual(1e-4);
        });
      expect(res.pca!.layer).toBe(K);
      expect(res.pca!.explained_variance_ratio.slice(0, 2).reduce((a, b) => a + b, 0)).toBeGreaterThanOrEqual(0.999);
      for (let l = 0; l < K; l++) expect(res.lasso!.coef[l]).toBe(0);
      expect(res.pairs.every((p) => p.distance.slice(0, K).every((d) => d === 0))).toBe(true);
    } finally {
      down.dispose();
      disposeModel(base);
    }
  });
});

describe("a CLI run on webgpu", () => {
  const ARGS = [
    "run",
    "--base",
    DEMO.base,
    "--tuned",
    DEMO.tuned,
    "--pairs",
    DEMO.pairs,
    "--limit",
    "4",
    "--batch",
    "1",
    "--sites",
    "resid_post",
    "--bootstrap",
    "100",
    "--stability",
    "2",
    "--folds",
    "2",
    "--no-controls",
    "--workers",
    "1",
  ];
  const results = (dir: string) => JSON.parse(fs.readFileSync(path.join(dir, "results.json"), "utf8"));
  const lines = (f: string) => (fs.existsSync(f) ? fs.readFileSync(f, "utf8").split("\n").length - 1 : 0);

  it("killed with SIGKILL after its first pair and resumed gives wasm's numbers, and says which adapter it ran on", async () => {
    const reference = path.join(tmpDir(), "wasm");
    const ref = runCli(...ARGS, "--out", reference, "--backend", "wasm");
    expect(ref.code, ref.err).toBe(0);
    const out = path.join(tmpDir(), "gpu");
    const child = spawn(process.execPath, [CLI, ...ARGS, "--out", out, "--backend", "webgpu"], {
      stdio: "ignore",
      env: childEnv(),
    });
    await new Promise<void>((resolve, reject) => {
      const t = setInterval(() => {
        if (lines(path.join(out, "pairs.jsonl")) >= 1) {
          clearInterval(t);
          child.kill("SIGKILL");
          resolve();
        }
      }, 5);
      child.on("exit", () => (clearInterval(t), reject(new Error("the run finished before it could be killed"))));
    });
    await new Promise((r) => child.on("exit", r));
    expect(fs.existsSync(path.join(out, "results.json"))).toBe(false);
    expect(lines(path.join(out, "pairs.jsonl"))).toBeLessThan(4);
    const r = cli([...ARGS, "--out", out, "--backend", "webgpu", "--resume"]);
    expect(r.code, r.err).toBe(0);
    expect(r.out).toMatch(/resumed: \d+ pairs from the earlier run/);
    expect(r.err.split("\n")[0]).toBe(`backend: ${description}`);
    const [gpu, cpu] = [results(out), results(reference)];
    expect(gpu.backend).toBe(description);
    // every per-pair number, gain and per-layer figure within float32 rounding of wasm's; LASSO's fit, which
    // amplifies rounding on 4 pairs, picks the same layers
    for (const k of ["pairs", "patching", "probes", "logit_lens", "pca", "summary"]) expectClose(gpu[k], cpu[k], k);
    expect(gpu.lasso.nonzero).toEqual(cpu.lasso.nonzero);
    expect(maxAbsDiff(gpu.lasso.coef, cpu.lasso.coef)).toBeLessThanOrEqual(1e-2);
    expect(gpu.findings.length).toBe(cpu.findings.length);
  });
});
