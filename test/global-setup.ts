// Once per `vitest run`: the suite gets a temp dir of its own (TMPDIR, which the test workers and the CLI
// processes they start inherit), and must leave it empty: every folder a test makes is removed (tempdirs.ts).
// Runs of the suite side by side do not see each other's folders.
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

export default function setup(): () => void {
  const own = fs.mkdtempSync(path.join(os.tmpdir(), "prefprobe-suite-"));
  process.env.TMPDIR = own;
  return () => {
    const left = fs.readdirSync(own).filter((n) => !n.startsWith("tsx-")); // tsx's compile cache, not a test's
    fs.rmSync(own, { recursive: true, force: true });
    if (!left.length) return;
    // vitest reports an error thrown here but still exits 0, so the exit code is set too
    console.error(
      `FAIL: the tests left ${left.length} entries in the temp dir: ${left.slice(0, 5).join(", ")}${left.length > 5 ? ", …" : ""}`,
    );
    process.exitCode = 1;
  };
}
