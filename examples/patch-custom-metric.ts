// Clean/corrupted activation patching with a metric of your own. The clean prompt says "girl", the corrupted one
// "boy"; the metric is how much of the next-token probability of " She" or " He" goes to " She" at the end.
// Patching a site at the word's positions from the clean run into the corrupted one, layer by layer, shows where
// the difference is carried: in resid_post, by the word's own positions up to the last layer (whose output there
// no longer reaches the last position); in attn_out and mlp_out, by the layers that write it.
//   npx tsx examples/patch-custom-metric.ts [site: resid_post | resid_pre | attn_out | mlp_out]
import { disposeModel, initBackend, loadModel, loadTokenizer, patchSweep, type Metric } from "prefprobe";

await initBackend();
const dir = "fixtures/models/stories260k";
const model = await loadModel(dir);
const tok = loadTokenizer(dir)!;
const site = (process.argv[2] ?? "resid_post") as "resid_pre" | "attn_out" | "mlp_out" | "resid_post";
const clean = tok.encode("Once upon a time, there was a little girl named Lily.");
const corrupt = tok.encode("Once upon a time, there was a little boy named Lily."); // as many tokens
const [she, he] = [tok.encode("She").at(-1)!, tok.encode("He").at(-1)!];
const word = [...corrupt.keys()].filter((t) => clean[t] !== corrupt[t]); // the positions of girl / boy

// p(She) / (p(She) + p(He)) after the last token, from the logits there, in float64
const sheShare: Metric = {
  at: [corrupt.length - 1],
  value: ({ logits }) => {
    const z = logits![0]!;
    return 1 / (1 + Math.exp(z[he]! - z[she]!));
  },
};

const table = patchSweep(model, { source: clean, dest: corrupt, metric: sheShare, site, positions: word });
console.log(`clean (girl): ${table.source.toFixed(6)}`);
console.log(`corrupted (boy): ${table.dest.toFixed(6)}`);
console.log(`patching ${site} at positions ${word.join(", ")} from the clean run:`);
table.layers.forEach((l, i) => {
  const v = table.values[i]![0]!;
  const recovered = (v - table.dest) / (table.source - table.dest);
  console.log(`layer ${l}: ${v.toFixed(6)} (recovers ${recovered.toFixed(4)} of the difference)`);
});
disposeModel(model);
