#!/usr/bin/env node
// Embed texts with a nomic-embed-grpc server and print the vectors as JSON.
//
//   node embed.js --target 127.0.0.1:50051 --task search_query --dimensions 256 "text one" "text two"
//   printf 'text one\ntext two\n' | node embed.js --task search_document
//
// The API is loaded from protos/nomic_embed/v1/embed.proto at run time (no generated code).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const USAGE = `usage: node embed.js [--target HOST:PORT] [--task TASK] [--dimensions N] [--max-tokens N]
                     [--timeout SECONDS] [--protos DIR] [TEXT ...]
Texts come from the arguments, or one per line from standard input.
TASK: search_document (default), search_query, clustering, classification, raw.
Prints {"model", "variant", "dimensions", "embeddings": [[...], ...], "tokens": [...]}.`;

const TASKS = ['search_document', 'search_query', 'clustering', 'classification', 'raw'];

function parseCommandLine(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      target: { type: 'string', default: '127.0.0.1:50051' },
      task: { type: 'string', default: 'search_document' },
      dimensions: { type: 'string', default: '0' },
      'max-tokens': { type: 'string', default: '0' },
      timeout: { type: 'string', default: '60' },
      protos: { type: 'string', default: path.join(__dirname, '..', '..', 'protos') },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (!TASKS.includes(values.task)) {
    throw new Error(`--task must be one of ${TASKS.join(', ')}`);
  }
  return {
    target: values.target,
    task: `TASK_${values.task.toUpperCase()}`,
    dimensions: nonNegativeInteger(values.dimensions, '--dimensions'),
    maxTokens: nonNegativeInteger(values['max-tokens'], '--max-tokens'),
    timeoutMs: Number(values.timeout) * 1000,
    protos: values.protos,
    texts: positionals,
  };
}

function nonNegativeInteger(text, flag) {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0) throw new Error(`${flag} must be a non-negative integer, got ${text}`);
  return n;
}

function loadService(protosDir) {
  const definition = protoLoader.loadSync('nomic_embed/v1/embed.proto', {
    includeDirs: [protosDir],
    keepCase: true, // field names as in the .proto: long_text_mode, max_tokens, ...
    enums: String, // enum values by name: "TASK_SEARCH_QUERY"
    longs: Number, // uint64 token totals fit a double
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).nomic_embed.v1.EmbedService;
}

function connect(EmbedService, target) {
  return new EmbedService(target, grpc.credentials.createInsecure(), {
    // With a dns:/// target naming every replica (a headless Kubernetes Service), spread calls over them.
    'grpc.service_config': JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] }),
    // Large batches exceed grpc-js's 4 MiB default; the server allows 64 MiB.
    'grpc.max_receive_message_length': 64 * 1024 * 1024,
  });
}

function embed(client, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    client.Embed(request, { deadline: Date.now() + timeoutMs }, (error, response) =>
      error ? reject(error) : resolve(response));
  });
}

async function main() {
  let options;
  try {
    options = parseCommandLine(process.argv.slice(2));
  } catch (error) {
    console.error(`${error.message}\n${USAGE}`);
    process.exit(2);
  }
  const texts = options.texts.length > 0 ? options.texts
    : fs.readFileSync(0, 'utf8').split('\n').filter((line) => line.length > 0);
  const client = connect(loadService(options.protos), options.target);
  try {
    const response = await embed(client, {
      texts,
      task: options.task,
      dimensions: options.dimensions,
      max_tokens: options.maxTokens,
    }, options.timeoutMs);
    const meta = response.metadata;
    console.log(JSON.stringify({
      model: meta.model_id,
      variant: meta.variant,
      dimensions: meta.dimensions,
      embeddings: response.embeddings.map((e) => e.values),
      tokens: response.embeddings.map((e) => e.tokens),
    }));
  } catch (error) {
    // A gRPC status: e.g. "INVALID_ARGUMENT: dimensions: ..." for a bad request.
    const code = Object.keys(grpc.status).find((name) => grpc.status[name] === error.code) ?? error.code;
    console.error(`${code}: ${error.details ?? error.message}`);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main();
