// The native matmul (native/blas.c): every product against a float64 oracle written here (transposes, rank 3/4
// broadcasting, shapes of 0 and 1, inputs made by slices and transposes, heap growth inside the call,
// gradients), stored BF16/F16/F32 matrices read in place, the same bits for any thread count; and, in a copy of
// the package without the build, the fallback to plain wasm and the one-line error for --backend native.
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import fc from "fast-check";
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, describe, expect, it } from "vitest";
import { initBackend, wasmHeapBytes } from "../src/model/backend.js";
import { enableGradients } from "../src/model/gradients.js";
import {
  nativeStatus,
  nativeThreads,
  rowLogSumExp,
  StoredMatrix,
  storedMatMul,
  useNativeKernels,
} from "../src/model/native.js";
import { tmpDir } from "./helpers.js";

const status = nativeStatus();
const blasHeader = spawnSync("sh", ["native/blas-include.sh"], { encoding: "utf8" }).stdout.trim();
const haveBlas = blasHeader !== "" && fs.existsSync(path.join(blasHeader.split(/\s+/)[0]!, "cblas.h"));

it("is built wherever OpenBLAS's headers are installed (CI installs them), else says why it is not", () => {
  if (haveBlas || process.platform === "darwin")
    expect(status, "npm ci should have built native/: run npm run build:native").toMatchObject({ ok: true });
  else expect(status).toMatchObject({ ok: false, why: expect.stringMatching(/libopenblas-dev/) });
});

/** C = op(A) op(B) in float64 for row-major a [M, K] (or [K, M] with ta) and b [K, N] (or [N, K]); and Σ|a||b| per entry. */
function oracle(
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  M: number,
  N: number,
  K: number,
  ta: boolean,
  tb: boolean,
): { c: Float64Array; mag: Float64Array } {
  const c = new Float64Array(M * N);
  const mag = new Float64Array(M * N);
  for (let i = 0; i < M; i++)
    for (let j = 0; j < N; j++) {
      let s = 0;
      let m = 0;
      for (let k = 0; k < K; k++) {
        const p = (ta ? a[k * M + i]! : a[i * K + k]!) * (tb ? b[j * K + k]! : b[k * N + j]!);
        s += p;
        m += Math.abs(p);
      }
      c[i * N + j] = s;
      mag[i * N + j] = m;
    }
  return { c, mag };
}

/**
 * A float32 product is within K·2⁻²⁴·Σ|a·b| of the exact one (each of the K rounded products and sums adds at most
 * one unit of rounding relative to the running magnitude): a wrong element or a misplaced block is far outside.
 */
function expectProduct(
  got: ArrayLike<number>,
  want: { c: Float64Array; mag: Float64Array },
  K: number,
  what: string,
): void {
  expect(got.length, what).toBe(want.c.length);
  for (let i = 0; i < want.c.length; i++) {
    const bound = (K + 1) * 2 ** -24 * want.mag[i]! + 1e-30;
    if (!(Math.abs(got[i]! - want.c[i]!) <= bound))
      throw new Error(`${what}: entry ${i} is ${got[i]}, the float64 product ${want.c[i]} (bound ${bound})`);
  }
}

const values = (n: number, seed: number) =>
  Float32Array.from({ length: n }, (_, i) => Math.sin(1.7 * i + seed) * (1 + (i % 5)));

describe.skipIf(!status.ok)(
  `the native matmul kernel${status.ok ? "" : ` (not run: ${(status as { why: string }).why})`}`,
  () => {
    let ready = false;
    const start = async () => {
      if (!ready) {
        await initBackend("native");
        await enableGradients();
      }
      ready = true;
    };
    afterAll(() => useNativeKernels(true));

    it("equals a float64 oracle for every transpose, rank 2-4 broadcasting and shapes of 0 and 1, as tf.matMul and its gradients", async () => {
      await start();
      const dim = fc.integer({ min: 0, max: 13 });
      // leading dims: a common shape, each operand with some of its dims set to 1 and b with leading ones dropped
      // (numpy broadcasting, including [2, 1] against [1, 3], which the stock kernel cannot do)
      const leads = fc
        .array(fc.record({ n: fc.integer({ min: 1, max: 3 }), inA: fc.boolean(), inB: fc.boolean() }), { maxLength: 2 })
        .chain((ds) => fc.record({ ds: fc.constant(ds), drop: fc.integer({ min: 0, max: ds.length }) }))
        .map(({ ds, drop }) => ({
          la: ds.map((d) => (d.inA ? d.n : 1)),
          lb: ds.slice(drop).map((d) => (d.inB ? d.n : 1)),
        }));
      await fc.assert(
        fc.asyncProperty(
          dim,
          dim,
          dim,
          fc.boolean(),
          fc.boolean(),
          leads,
          fc.integer({ min: 0, max: 99 }),
          async (M, N, K, ta, tb, { la, lb }, seed) => {
            const aShape = [...la, ...(ta ? [K, M] : [M, K])];
            const bShape = [...lb, ...(tb ? [N, K] : [K, N])];
            const size = (s: number[]) => s.reduce((x, y) => x * y, 1);
            const av = values(size(aShape), seed);
            const bv = values(size(bShape), seed + 1);
            const a = tf.tensor(av, aShape);
            const b = tf.tensor(bv, bShape);
            const c = tf.matMul(a, b, ta, tb);
            const leadOut = tf.broadcast_util.assertAndGetBroadcastShape(la, lb);
            expect(c.shape).toEqual([...leadOut, M, N]);
            const got = c.dataSync();
            const nOut = size(leadOut);
            const pa = [...new Array(leadOut.length - la.length).fill(1), ...la];
            const pb = [...new Array(leadOut.length - lb.length).fill(1), ...lb];
            for (let i = 0; i < nOut; i++) {
              // the a and b blocks that output block i reads under broadcasting
              let [rest, ia, ib, sa, sb] = [i, 0, 0, 1, 1];
              for (let d = leadOut.length - 1; d >= 0; d--) {
                const idx = rest % leadOut[d]!;
                rest = Math.floor(rest / leadOut[d]!);
                if (pa[d]! > 1) ia += idx * sa;
                if (pb[d]! > 1) ib += idx * sb;
                sa *= pa[d]!;
                sb *= pb[d]!;
              }
              const want = oracle(
                av.subarray(ia * M * K, (ia + 1) * M * K),
                bv.subarray(ib * K * N, (ib + 1) * K * N),
                M,
                N,
                K,
                ta,
                tb,
              );
              expectProduct(
                got.subarray(i * M * N, (i + 1) * M * N),
                want,
                K,
                `[${aShape}]${ta ? "ᵀ" : ""}·[${bShape}]${tb ? "ᵀ" : ""} block ${i}`,
              );
            }
            // gradients: d/dA Σ(C ⊙ G) = G·op(B)ᵀ summed over broadcast blocks, against the stock kernel's (same formula, other kernel)
            if (la.length === 0 && lb.length === 0 && M * N * K > 0) {
              const g = tf.tensor(values(M * N, seed + 2), [M, N]);
              const grads = () =>
                tf.grads((x: tf.Tensor, y: tf.Tensor) => tf.sum(tf.mul(tf.matMul(x, y, ta, tb), g)))([a, b]);
              const [da, db] = grads();
              useNativeKernels(false);
              const [sa, sb] = grads();
              useNativeKernels(true);
              const scale = (t: tf.Tensor) => Math.max(1e-30, ...Array.from(t.dataSync(), Math.abs));
              for (const [x, y] of [
                [da, sa],
                [db, sb],
              ] as const) {
                const d = Array.from(x!.dataSync(), (v, i) => Math.abs(v - y!.dataSync()[i]!));
                expect(Math.max(0, ...d) / scale(y!)).toBeLessThan(2 * (K + M + N) * 2 ** -24);
              }
              tf.dispose([g, da!, db!, sa!, sb!]);
            }
            tf.dispose([a, b, c]);
          },
        ),
        { numRuns: 120, seed: 20261203 },
      );
    });

    it("reads inputs made by slices and transposes, and an output that grows the heap inside the call", async () => {
      await start();
      const big = tf.tensor(values(12 * 40, 3), [12, 40]);
      const a = tf.slice(tf.transpose(big), [5, 2], [17, 7]); // [17, 7], strided in big
      const b = tf.slice(big, [3, 9], [7, 11]); // [7, 11]
      expectProduct(
        tf.matMul(a, b).dataSync(),
        oracle(a.dataSync(), b.dataSync(), 17, 11, 7, false, false),
        7,
        "sliced",
      );
      // an output larger than the whole heap so far: the heap grows while the kernel allocates it, and the kernel
      // must read the operands through the new buffer
      const heap = wasmHeapBytes()!;
      const rows = Math.ceil(heap / 4 / 64) + 64;
      const x = tf.tensor(values(rows, 5), [rows, 1]);
      const y = tf.tensor(values(64, 6), [1, 64]);
      const z = tf.matMul(x, y);
      expect(wasmHeapBytes()!).toBeGreaterThan(heap);
      const zv = z.dataSync();
      const [xv, yv] = [x.dataSync(), y.dataSync()];
      for (const i of [0, 1, rows >> 1, rows - 1])
        for (const j of [0, 63]) expect(zv[i * 64 + j]).toBe(Math.fround(xv[i]! * yv[j]!));
      tf.dispose([big, a, b, x, y, z]);
    });

    it("gives the same bits on 1, 2, 3 or 7 threads a call", async () => {
      await start();
      const a = tf.tensor(values(70 * 300, 1), [70, 300]);
      const b = tf.tensor(values(300 * 700, 2), [300, 700]);
      const runs = [1, 2, 3, 7].map((t) => {
        useNativeKernels(true, t);
        expect(nativeThreads()).toBe(t);
        const c = tf.matMul(a, b);
        const v = c.dataSync().slice();
        c.dispose();
        return v;
      });
      for (const r of runs.slice(1)) expect(r).toEqual(runs[0]);
      expect(() => useNativeKernels(true, 0)).toThrow(/threads must be an integer ≥ 1/);
      tf.dispose([a, b]);
    });

    it("gathers as wasm's own GatherV2 does (any axis, float32 and int32), and refuses an index out of range", async () => {
      await start();
      const shape = fc.array(fc.integer({ min: 1, max: 5 }), { minLength: 1, maxLength: 4 });
      fc.assert(
        fc.property(
          shape,
          fc.nat(),
          fc.array(fc.nat(), { minLength: 0, maxLength: 9 }),
          fc.boolean(),
          (s, axisSeed, picks, int) => {
            const axis = axisSeed % s.length;
            const n = s.reduce((a, b) => a * b, 1);
            const x = int
              ? tf.tensor(
                  Int32Array.from({ length: n }, (_, i) => i * 7 - 3),
                  s,
                  "int32",
                )
              : tf.tensor(values(n, 9), s);
            const idx = tf.tensor1d(
              picks.map((p) => p % s[axis]!),
              "int32",
            );
            const ours = tf.gather(x, idx, axis);
            useNativeKernels(false);
            const theirs = tf.gather(x, idx, axis);
            useNativeKernels(true);
            expect(ours.shape).toEqual(theirs.shape);
            expect(ours.dtype).toBe(theirs.dtype);
            expect(Array.from(ours.dataSync())).toEqual(Array.from(theirs.dataSync()));
            tf.dispose([x, idx, ours, theirs]);
          },
        ),
        { numRuns: 60, seed: 3 },
      );
      const before = tf.memory().numTensors;
      const x = tf.ones([3, 2]);
      expect(() => tf.gather(x, tf.tensor1d([0, 3], "int32"))).toThrow(/gather index 3 is outside \[0, 3\)/);
      x.dispose();
      expect(tf.memory().numTensors - before).toBeLessThanOrEqual(1); // the index tensor of the failed call
    });

    it("takes each row's log-sum-exp as a float64 log-softmax would, at ±Infinity and NaN too", async () => {
      await start();
      const rows = [
        Array.from(values(300, 2), (v) => 30 * v),
        [0, 0, 0],
        [-Infinity, -Infinity],
        [-Infinity, 2],
        [1, Infinity],
        [NaN, 1],
        [88, 89, -100],
      ];
      for (const r of rows) {
        const got = rowLogSumExp(tf.tensor2d([r])).dataSync()[0]!;
        const m = Math.max(...r);
        const want = r.some(Number.isNaN)
          ? NaN
          : m === Infinity
            ? Infinity
            : m === -Infinity
              ? -Infinity
              : m + Math.log(r.reduce((a, v) => a + Math.exp(v - m), 0));
        if (Number.isFinite(want)) expect(Math.abs(got - want)).toBeLessThan(2e-7 * Math.max(1, Math.abs(want)));
        else expect(got).toBe(want);
      }
    });

    it("multiplies by stored F32, BF16 and F16 matrices where they lie, with the bits of the widened tensor and a gradient", async () => {
      await start();
      const [M, N, K] = [9, 1300, 37]; // N spans several 1024-column slices
      // values exact in BF16 and F16: multiples of 2^-6 below 2
      const w = Float32Array.from({ length: N * K }, (_, i) => (((i * 37) % 127) - 63) / 64);
      const bits = new Uint32Array(w.buffer);
      const bf16 = Uint16Array.from(bits, (u) => u >>> 16);
      const f16 = Uint16Array.from(w, (v) => {
        // exact: |v| < 2 and a multiple of 2^-6, so sign, exponent and a 10-bit mantissa hold it
        if (v === 0) return 0;
        const s = v < 0 ? 0x8000 : 0;
        const e = Math.floor(Math.log2(Math.abs(v)));
        return s | ((e + 15) << 10) | Math.round((Math.abs(v) / 2 ** e - 1) * 1024);
      });
      const x = tf.tensor(values(M * K, 4), [M, K]);
      const wt = tf.tensor(w, [N, K]); // [out, in] as stored
      const want = tf.matMul(x, wt, false, true).dataSync();
      expectProduct(want, oracle(x.dataSync(), w, M, N, K, false, true), K, "tensor");
      for (const [bytes, dtype] of [
        [new Uint8Array(w.buffer.slice(0)), "F32"],
        [new Uint8Array(bf16.buffer), "BF16"],
        [new Uint8Array(f16.buffer), "F16"],
      ] as const) {
        const m = new StoredMatrix(bytes, dtype, N, K);
        const y = storedMatMul(x, m);
        expect(y.dataSync(), dtype).toEqual(want);
        // x [M, N] · W → [M, K] (the transposed use, which the gradient takes)
        const g = tf.tensor(values(M * N, 8), [M, N]);
        const back = storedMatMul(g, m, true);
        expect(back.dataSync(), `${dtype} transposed`).toEqual(tf.matMul(g, wt).dataSync());
        const dx = tf.grad((v: tf.Tensor) => tf.sum(tf.mul(storedMatMul(v, m), g)))(x);
        expect(dx.dataSync(), `${dtype} gradient`).toEqual(back.dataSync());
        tf.dispose([y, g, back, dx]);
      }
      expect(() => new StoredMatrix(new Uint8Array(10), "BF16", 2, 3)).toThrow(/needs 12 bytes, got 10/);
      tf.dispose([x, wt]);
    });
  },
);

describe("without the native build", () => {
  /** A copy of the package (the built library, the native sources, not their build) that shares node_modules. */
  function copyWithoutBuild(): string {
    const dir = tmpDir();
    for (const f of ["package.json", "dist", "native/binding.gyp", "native/blas.c", "native/blas-include.sh"]) {
      fs.mkdirSync(path.dirname(path.join(dir, f)), { recursive: true });
      fs.cpSync(f, path.join(dir, f), { recursive: true, filter: (src) => !src.includes(`native${path.sep}build`) });
    }
    fs.symlinkSync(path.resolve("node_modules"), path.join(dir, "node_modules"));
    return dir;
  }
  const model = path.resolve("fixtures/models/stories260k");
  const cli = (dir: string, ...args: string[]) => {
    const env = { ...process.env };
    delete env.PREFPROBE_BACKEND;
    const r = spawnSync(process.execPath, [path.join(dir, "dist/src/cli.js"), ...args], { encoding: "utf8", env });
    return { code: r.status, err: r.stderr, out: r.stdout };
  };

  it("every command runs on plain wasm and says in one line why and how to get the native matmul; --backend native is a one-line error", () => {
    const dir = copyWithoutBuild();
    try {
      const r = cli(dir, "logits", "--model", model, "--ids", "1,5,9");
      expect(r.code, r.err).toBe(0);
      expect(r.err.split("\n")[0]).toMatch(
        /^backend: wasm \(SIMD\); the faster native matmul is not used: it has not been built; install OpenBLAS \(apt-get install libopenblas-dev.*npm run build:native$/,
      );
      const forced = cli(dir, "logits", "--model", model, "--ids", "1", "--backend", "native");
      expect(forced.code).toBe(1);
      expect(forced.err.trim().split("\n")).toHaveLength(1);
      expect(forced.err).toMatch(
        /^prefprobe: error: backend "native" is not available: the native matmul is not available here: it has not been built/,
      );
      // the install script's reason, when it failed
      fs.writeFileSync(path.join(dir, "native/build-failed.txt"), "OpenBLAS's cblas.h was not found\n");
      expect(cli(dir, "logits", "--model", model, "--ids", "1").err).toMatch(
        /not used: OpenBLAS's cblas.h was not found; install OpenBLAS/,
      );
      // a broken build (not a loadable addon) falls back the same way, naming the file
      fs.mkdirSync(path.join(dir, "native/build/Release"), { recursive: true });
      fs.writeFileSync(path.join(dir, "native/build/Release/prefprobe_blas.node"), "not a shared object");
      const broken = cli(dir, "logits", "--model", model, "--ids", "1");
      expect(broken.code, broken.err).toBe(0);
      expect(broken.err.split("\n")[0]).toMatch(
        /^backend: wasm \(SIMD\); the faster native matmul is not used: native\/build\/Release\/prefprobe_blas.node does not load \(.*\); rebuild it with npm run build:native$/,
      );
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it.skipIf(process.platform === "darwin")(
    "the install script never fails npm ci: without OpenBLAS it writes the reason and exits 0 (--strict: 1) (Linux: macOS has Accelerate)",
    () => {
      const dir = copyWithoutBuild();
      try {
        fs.mkdirSync(path.join(dir, "scripts"));
        fs.copyFileSync("scripts/build-native.mjs", path.join(dir, "scripts/build-native.mjs"));
        // a header search that finds nothing, as on a machine without libopenblas-dev
        fs.writeFileSync(path.join(dir, "native/blas-include.sh"), "#!/bin/sh\n");
        const r = spawnSync(process.execPath, [path.join(dir, "scripts/build-native.mjs")], { encoding: "utf8" });
        expect(r.status).toBe(0);
        expect(r.stderr).toMatch(
          /native matmul not built \(OpenBLAS's cblas.h was not found\); prefprobe runs on plain wasm/,
        );
        expect(fs.readFileSync(path.join(dir, "native/build-failed.txt"), "utf8")).toBe(
          "OpenBLAS's cblas.h was not found\n",
        );
        expect(spawnSync(process.execPath, [path.join(dir, "scripts/build-native.mjs"), "--strict"]).status).toBe(1);
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    },
  );
});
