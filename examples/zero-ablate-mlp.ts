// Zero-ablate one MLP of the base model and see how each pair's reward margin moves.
//   npx tsx examples/zero-ablate-mlp.ts [layer] [pairs]
import { disposeModel, hookName, loadModel, loadPairs, margins, tf } from "prefprobe";

const modelDir = "fixtures/models/stories260k";
const layer = Number(process.argv[2] ?? 2);
const pairs = loadPairs("fixtures/data/stories/test.jsonl", modelDir, { limit: Number(process.argv[3] ?? 4) });
const model = await loadModel(modelDir);

// margin = log p(chosen | prompt) − log p(rejected | prompt), with and without the MLP's output zeroed
const clean = margins(model, pairs);
const ablated = margins(model, pairs, { hooks: { [hookName("mlp_out", layer)]: (v) => tf.zerosLike(v) } });

console.log(`zero-ablating ${hookName("mlp_out", layer)} of ${modelDir}`);
pairs.forEach((p, i) => {
  const change = ablated[i]! - clean[i]!;
  console.log(
    `pair ${p.index} (line ${p.line}): margin ${clean[i]!.toFixed(6)} -> ${ablated[i]!.toFixed(6)} (change ${change >= 0 ? "+" : ""}${change.toFixed(6)})`,
  );
});
const meanChange = ablated.reduce((a, m, i) => a + m - clean[i]!, 0) / pairs.length;
console.log(`mean change: ${meanChange.toFixed(6)}`);
disposeModel(model);
