// One defaults object for the CLI and the library; partial settings are filled in and every value checked.
import { describe, expect, it } from "vitest";
import { DEFAULT_SETTINGS, resolveSettings, RUN_SETTINGS, SettingsError } from "../src/analysis/settings.js";
import * as fs from "node:fs";
import * as path from "node:path";
import { runCli, tmpDir } from "./helpers.js";

describe("settings", () => {
  it("fills what a partial object leaves out from DEFAULT_SETTINGS, which cannot be changed by accident", () => {
    const s = resolveSettings({ seed: 3, sites: ["mlp_out"] });
    expect(s).toEqual({ ...DEFAULT_SETTINGS, seed: 3, sites: ["mlp_out"] });
    expect(Object.isFrozen(DEFAULT_SETTINGS)).toBe(true);
    // a key given as undefined is left out, as the CLI leaves out an option not given
    expect(resolveSettings({ seed: 3, batchPairs: undefined })).toEqual({ ...DEFAULT_SETTINGS, seed: 3 });
  });

  it.each([
    [{ folds: 1 }, /folds must be an integer ≥ 2/],
    [{ alpha: NaN }, /alpha must be a number in \[−100, 100\], got NaN/],
    [{ alpha: -101 }, /alpha must be a number in/],
    [{ window: 6 }, /window is more than the model's 5 layers, got 6/],
    [{ sites: ["resid"] as never }, /unknown site "resid"/],
    [{ directions: ["up"] as never }, /unknown direction "up"/],
    [{ layers: [1, 1] }, /layers lists layer 1 twice/],
    [{ layers: [] }, /layers is empty/],
    [{ layers: [5] }, /layers has layer 5, outside 0\.\.4/],
    [{ pcaLayer: 7 }, /pcaLayer is outside 0\.\.4, got 7/],
    [{ sites: ["mlp_out", "mlp_out"] as never }, /sites must not repeat/],
    [{ windw: 2 } as never, /unknown setting "windw"/],
    [{ pcaTestFrac: 1 }, /pcaTestFrac must be in \(0, 1\)/],
    [{ batchPairs: 0 }, /batchPairs must be an integer ≥ 1/],
    // a resample count too small to give an interval or a selection frequency
    [{ bootstrap: 1 }, /^bootstrap must be 0 \(no intervals\) or at least 100 resamples, got 1$/],
    [{ bootstrap: 99 }, /^bootstrap must be 0 \(no intervals\) or at least 100 resamples, got 99$/],
    [{ bootstrap: 150.5 }, /^bootstrap must be 0/],
    [{ stabilityReps: 1 }, /^stabilityReps must be 0 \(no stability selection\) or at least 2 refits, got 1$/],
  ])("refuses %j with a message naming it", (partial, msg) => {
    expect(() => resolveSettings(partial, { numLayers: 5 })).toThrow(SettingsError);
    expect(() => resolveSettings(partial, { numLayers: 5 })).toThrow(msg);
  });

  it("bootstrap and stability take 0 (none) and counts from 100 and 2 resamples", () => {
    for (const bootstrap of [0, 100, 1000]) expect(resolveSettings({ bootstrap }).bootstrap).toBe(bootstrap);
    for (const stabilityReps of [0, 2, 100])
      expect(resolveSettings({ stabilityReps }).stabilityReps).toBe(stabilityReps);
  });

  it("--bootstrap 1 and --stability 1 are one-line errors naming the flag, before anything is made", () => {
    for (const [flag, msg] of [
      ["--bootstrap", "--bootstrap must be 0 (no intervals) or at least 100 resamples, got 1"],
      ["--stability", "--stability must be 0 (no stability selection) or at least 2 refits, got 1"],
    ] as const) {
      const out = path.join(tmpDir(), "o");
      const r = runCli(
        "run",
        "--base",
        "fixtures/models/stories260k",
        "--tuned",
        "fixtures/models/stories260k",
        "--pairs",
        "fixtures/data/stories/test.jsonl",
        "--out",
        out,
        flag,
        "1",
      );
      expect(r.code, flag).toBe(1);
      expect(r.err.trim().split("\n"), flag).toEqual([`prefprobe: error: ${msg}`]);
      expect(fs.existsSync(out), flag).toBe(false);
    }
  });

  it("one table gives every setting its default, its check and its flag, and run --help lists each flag", () => {
    const help = runCli("run", "--help").out;
    for (const [key, spec] of Object.entries(RUN_SETTINGS)) {
      expect(DEFAULT_SETTINGS[key as keyof typeof DEFAULT_SETTINGS]).toEqual(spec.default);
      expect(help, key).toContain(spec.flag.split(" ")[0]!);
    }
    expect(Object.keys(DEFAULT_SETTINGS)).toEqual(Object.keys(RUN_SETTINGS));
  });

  it("a bad value on the command line is the library's message with the flag named", () => {
    const r = runCli("run", "--base", "x", "--tuned", "y", "--pairs", "z", "--out", "w", "--pca-test-frac", "2");
    expect(r.code).toBe(1);
    expect(r.err.trim().split("\n").at(-1)).toMatch(/^prefprobe: error: --pca-test-frac must be in \(0, 1\), got 2$/);
  });

  it("the CLI's run defaults are DEFAULT_SETTINGS", () => {
    const help = runCli("run", "--help").out.replace(/\s+/g, " ");
    for (const [flag, value] of [
      ["--alpha", DEFAULT_SETTINGS.alpha],
      ["--folds", DEFAULT_SETTINGS.folds],
      ["--bootstrap", DEFAULT_SETTINGS.bootstrap],
      ["--stability", DEFAULT_SETTINGS.stabilityReps],
      ["--batch", DEFAULT_SETTINGS.batchPairs],
      ["--seed", DEFAULT_SETTINGS.seed],
      ["--pca-test-frac", DEFAULT_SETTINGS.pcaTestFrac],
    ] as const) {
      expect(help).toMatch(new RegExp(`${flag} <\\w+> (?:(?!--).)*?\\(default: "?${value}"?\\)`));
    }
  });
});

describe("default worker threads", () => {
  it("one per core, but on wasm no more than the machine's memory holds beside the stored weights, each worker counted at its whole heap", async () => {
    const { defaultWorkers, MAIN_THREAD_BYTES, WASM_WORKER_BYTES } = await import("../src/parallel.js");
    const GiB = 2 ** 30;
    const held = 4.6 * GiB; // two Llama-3.2-1B models in BF16
    expect(defaultWorkers("wasm", held, { cores: 2, memory: 24 * GiB })).toBe(2);
    expect(defaultWorkers("wasm", held, { cores: 16, memory: 24 * GiB })).toBe(
      Math.floor((24 * GiB - held - MAIN_THREAD_BYTES) / WASM_WORKER_BYTES),
    );
    expect(defaultWorkers("wasm", held, { cores: 2, memory: 8 * GiB })).toBe(1);
    expect(defaultWorkers("wasm", 100 * GiB, { cores: 2, memory: 8 * GiB })).toBe(1); // never 0
    expect(defaultWorkers("wasm (SIMD)", 0, { cores: 4, memory: 64 * GiB })).toBe(4);
    expect(defaultWorkers("cpu", held, { cores: 3, memory: 8 * GiB })).toBe(3);
    expect(defaultWorkers("tensorflow", 0, { cores: 8, memory: 64 * GiB })).toBe(1);
  });
});
