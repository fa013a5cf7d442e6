// Once per `vitest run`: the suite must leave the OS temp dir with no more prefprobe-* entries than it found.
import { prefprobeTempEntries } from "./tempdirs.js";

export default function setup(): () => void {
  const before = new Set(prefprobeTempEntries());
  return () => {
    const left = prefprobeTempEntries().filter((n) => !before.has(n));
    if (!left.length) return;
    // vitest reports an error thrown here but still exits 0, so the exit code is set too
    console.error(
      `FAIL: the tests left ${left.length} prefprobe-* entries in the temp dir: ${left.slice(0, 5).join(", ")}${left.length > 5 ? ", …" : ""}`,
    );
    process.exitCode = 1;
  };
}
