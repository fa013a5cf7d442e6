// prefprobe as a dependency: a fresh project outside the repo installs it from a path, type-checks a
// TypeScript file that imports from "prefprobe" under --strict (no skipLibCheck), and runs it. Importing
// the package runs nothing (the CLI lives in its own module).
import { execFileSync, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { describe, expect, it } from "vitest";
import { tmpDir } from "./helpers.js";

// --ignore-scripts: npm would run our prepare (tsc) and rewrite dist/ while other test files run the CLI from it
const repo = path.resolve(".");

const USER_CODE = (repo: string) => `
import { loadModel, forward, hookName, hookNames, runAnalysis, loadPairs, tf, type HookName, type Results } from "prefprobe";

const base = await loadModel(${JSON.stringify(path.join(repo, "fixtures/models/stories260k"))});
const tuned = await loadModel(${JSON.stringify(path.join(repo, "fixtures/models/stories260k-dpo"))});
const names: HookName[] = hookNames(base.config);
const { logits, cache, dispose } = forward(base, [[1, 2, 3]], {
  cache: (n) => n.endsWith("hook_resid_post"),
  hooks: { [hookName("mlp_out", 3)]: (v) => v.mul(0) }, // a chained op, as TransformerLens-style hooks are written
});
console.log(\`sites \${names.length} cached \${cache.size} logits \${logits!.shape.join("x")}\`);
dispose();
const pairs = loadPairs(${JSON.stringify(path.join(repo, "fixtures/data/stories/test.jsonl"))}, ${JSON.stringify(path.join(repo, "fixtures/models/stories260k"))}, { limit: 3 });
const results: Results = await runAnalysis(base, tuned, pairs, { seed: 1, sites: ["resid_post"], bootstrap: 100, stabilityReps: 2 });
console.log(\`pairs \${results.n_pairs} entries \${results.patching.length} last \${results.patching.at(-1)!.recovery.toFixed(3)}\`);
const pattern = tf.tensor2d([[1, 2], [3, 4]]);
console.log(\`chained \${pattern.mul(2).sum(-1).arraySync()} \${pattern.transpose().reshape([4]).arraySync()}\`);
`;

/** A fresh project with prefprobe installed from the repo's path (made once, for the first two tests). */
let project: string | undefined;
function userProject(): string {
  if (project) return project;
  const dir = tmpDir();
  fs.writeFileSync(
    path.join(dir, "package.json"),
    JSON.stringify({ name: "user-project", private: true, type: "module" }),
  );
  execFileSync("npm", ["install", repo, "--no-audit", "--no-fund", "--offline", "--ignore-scripts"], {
    cwd: dir,
    stdio: "pipe",
  });
  return (project = dir);
}

describe("prefprobe as a library", () => {
  it("installs from a path into a fresh project, type-checks under --strict and runs", () => {
    const dir = userProject();
    fs.writeFileSync(path.join(dir, "main.ts"), USER_CODE(repo));
    fs.writeFileSync(
      path.join(dir, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: { strict: true, module: "nodenext", moduleResolution: "nodenext", target: "es2022" },
        files: ["main.ts"],
      }),
    );
    const tsc = spawnSync(process.execPath, [path.join(repo, "node_modules/typescript/bin/tsc"), "-p", "."], {
      cwd: dir,
      encoding: "utf8",
    });
    expect(tsc.stdout + tsc.stderr).toBe("");
    expect(tsc.status).toBe(0);
    const run = spawnSync(process.execPath, ["main.js"], { cwd: dir, encoding: "utf8" });
    expect(run.stderr).toBe("");
    const lines = run.stdout.trim().split("\n");
    expect(lines[0]).toBe("sites 82 cached 5 logits 1x3x512"); // 5 layers × 16 sites + embed + ln_final
    expect(lines[1]).toMatch(/^pairs 3 entries 5 last -?\d\.\d{3}$/);
    expect(lines[2]).toBe("chained 6,14 1,3,2,4"); // tfjs's chained ops, typed and registered by the import
  });

  it("the README's library example type-checks under --strict and runs in the fresh project", () => {
    const dir = userProject();
    const readme = fs.readFileSync(path.join(repo, "README.md"), "utf8");
    const code = /```ts\n([\s\S]*?)```/.exec(readme)![1]!;
    expect(code).toContain('from "prefprobe"');
    // the fixture paths are the repo's; print what the snippet computed so its run is checked, not only started
    const abs = code.replaceAll('"fixtures/', `"${repo}/fixtures/`);
    fs.writeFileSync(path.join(dir, "readme.ts"), `${abs}\nconsole.log(mBase.length, mTuned.length, patched.size);\n`);
    fs.writeFileSync(
      path.join(dir, "tsconfig.readme.json"),
      JSON.stringify({
        compilerOptions: { strict: true, module: "nodenext", moduleResolution: "nodenext", target: "es2022" },
        files: ["readme.ts"],
      }),
    );
    const tsc = spawnSync(
      process.execPath,
      [path.join(repo, "node_modules/typescript/bin/tsc"), "-p", "tsconfig.readme.json"],
      { cwd: dir, encoding: "utf8" },
    );
    expect(tsc.stdout + tsc.stderr).toBe("");
    const run = spawnSync(process.execPath, ["readme.js"], { cwd: dir, encoding: "utf8" });
    expect(run.status, run.stderr).toBe(0);
    expect(run.stdout.trim().split("\n").at(-1)).toBe("8 8 5");
  });

  it("a type error in user code is reported (the check above is not vacuous)", () => {
    const dir = userProject();
    fs.writeFileSync(
      path.join(dir, "bad.ts"),
      `import { hookName } from "prefprobe";\nconst n: number = hookName("mlp_out", 1);\nconsole.log(n);\n`,
    );
    fs.writeFileSync(
      path.join(dir, "tsconfig.bad.json"),
      JSON.stringify({
        compilerOptions: {
          strict: true,
          module: "nodenext",
          moduleResolution: "nodenext",
          target: "es2022",
          noEmit: true,
        },
        files: ["bad.ts"],
      }),
    );
    const tsc = spawnSync(
      process.execPath,
      [path.join(repo, "node_modules/typescript/bin/tsc"), "-p", "tsconfig.bad.json"],
      { cwd: dir, encoding: "utf8" },
    );
    expect(tsc.status).not.toBe(0);
    expect(tsc.stdout).toMatch(/not assignable to type 'number'/);
  });

  it("importing the package prints nothing and runs no command", () => {
    const r = spawnSync(
      process.execPath,
      [
        "--input-type=module",
        "-e",
        `import * as p from "prefprobe"; console.log(typeof p.runAnalysis, typeof p.forward, typeof p.tf.tensor, typeof p.tf.Tensor.prototype.sum);`,
      ],
      { cwd: repo, encoding: "utf8" },
    );
    expect(r.status).toBe(0);
    expect(r.stderr).toBe("");
    expect(r.stdout.trim()).toBe("function function function function"); // chained ops are there
  });
});
