// The stock `openai` npm package against a Thox server: chat, stream, embeddings.
// Usage: node smoke.mjs BASE_URL API_KEY MODEL
import OpenAI from 'openai';

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const out = {};

const chat = await client.chat.completions.create({
  model, messages: [{ role: 'user', content: 'Explain async/await in JavaScript' }], max_tokens: 8,
});
out.chat = { content: chat.choices[0].message.content, usage: chat.usage, finish: chat.choices[0].finish_reason };

// the guide's streaming example
const response = await client.chat.completions.create({
  model, messages: [{ role: 'user', content: 'Explain async/await in JavaScript' }], stream: true, max_tokens: 8,
});
let text = '';
let chunks = 0;
for await (const chunk of response) {
  text += chunk.choices[0]?.delta?.content || '';
  chunks += 1;
}
out.stream = { text, chunks };

const emb = await client.embeddings.create({ model, input: ['hello', 'world'] });
out.embeddings = { count: emb.data.length, dims: emb.data[0].embedding.length, usage: emb.usage };

try {
  await new OpenAI({ baseURL, apiKey: 'wrong', maxRetries: 0 }).models.list();
  out.badKey = 'accepted';
} catch (e) {
  out.badKey = e.status;
}
console.log(JSON.stringify(out));
