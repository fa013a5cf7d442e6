// Where one attention head looks: the attention pattern (attn.hook_pattern) of a head of the demo model on a
// prompt, and for each token the position it attends to most (by default layer 1's head 3, which mostly looks
// at the token just before).
//   npx tsx examples/attention-pattern.ts [layer] [head] [text]
import { disposeModel, forward, hookName, loadModel, loadTokenizer } from "prefprobe";

const modelDir = "fixtures/models/stories260k";
const [layer, head] = [Number(process.argv[2] ?? 1), Number(process.argv[3] ?? 3)];
const text = process.argv[4] ?? "Once upon a time, there was a little girl named Kitty.";
const model = await loadModel(modelDir);
if (!(Number.isInteger(head) && head >= 0 && head < model.config.numHeads))
  throw new Error(`head must be in 0..${model.config.numHeads - 1}`);
const tokenizer = loadTokenizer(modelDir)!;
const ids = tokenizer.encode(text); // BOS first, as the tokenizer's own settings say

// [batch, heads, query, key]: each query's softmax over the keys, exactly 0 on the keys after it. Only this
// layer's pattern is cached, and the pass stops after the layer: nothing later is needed.
const site = hookName("pattern", layer);
const { cache, dispose } = forward(model, [ids], { cache: [site], stopAfter: layer, logitsAt: "none" });
const pattern = (cache.get(site).arraySync() as number[][][][])[0]![head]!; // [query][key]
dispose();

const token = (t: number) => `id ${ids[t]} ${JSON.stringify(tokenizer.idToToken(ids[t]!) ?? "?")}`;
console.log(`${site}, head ${head}, on ${ids.length} tokens of ${JSON.stringify(text)}`);
pattern.forEach((row, q) => {
  const seen = row.slice(0, q + 1); // the keys this query may look at
  const top = seen.indexOf(Math.max(...seen));
  console.log(
    `position ${q} (${token(q)}) attends most to position ${top} (${token(top)}) with ${seen[top]!.toFixed(6)}; ` +
      `pattern ${seen.map((p) => p.toFixed(6)).join(" ")}`,
  );
});
disposeModel(model);
