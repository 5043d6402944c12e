/**
 * Start options, the pure part: parsing and checking what a user types into the start dialog,
 * the tags an image repository has in the store, and reading what a notebook recorded.
 *
 * Owns: the client-side mirror of the server's rules (jupyter_contain/kernel/start_options.py),
 * used only to help while typing: the server checks every value again under its ceilings, and
 * the provisioner once more. Must not: touch the DOM or the network (so jest tests it directly).
 */

/** What one kernel start asks for; absent fields keep the kernelspec's values. */
export interface StartOptions {
  memory?: string;
  cpus?: string;
  network?: string;
  tag?: string;
}

/** The server's ceilings, as GET config reports them. */
export interface StartLimits {
  max_memory: number | null;
  max_cpus: number | null;
  networks: string[];
}

const FIELDS: (keyof StartOptions)[] = ['memory', 'cpus', 'network', 'tag'];
const MEMORY = /^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$/;
const UNITS: Record<string, number> = {
  '': 1, b: 1,
  k: 2 ** 10, kb: 2 ** 10, kib: 2 ** 10,
  m: 2 ** 20, mb: 2 ** 20, mib: 2 ** 20,
  g: 2 ** 30, gb: 2 ** 30, gib: 2 ** 30,
  t: 2 ** 40, tb: 2 ** 40, tib: 2 ** 40
};
const TAG = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
export const MIN_CPUS = 0.01;

/** Bytes of a memory size as Docker's --memory takes it ("512m", "1.5g"; binary units), or null. */
export function parseMemory(text: string): number | null {
  const m = MEMORY.exec(text);
  if (!m) {
    return null;
  }
  const unit = UNITS[m[2].toLowerCase()];
  if (unit === undefined) {
    return null;
  }
  const value = Math.floor(Number(m[1]) * unit);
  return value > 0 ? value : null;
}

/** A CPU count ("0.5", "2"), or null. */
export function parseCpus(text: string): number | null {
  if (!/^\s*[0-9]*\.?[0-9]+\s*$/.test(text)) {
    return null;
  }
  const value = Number(text);
  return Number.isFinite(value) && value >= MIN_CPUS ? value : null;
}

function mib(bytes: number): string {
  return `${Math.floor(bytes / 2 ** 20)} MiB`;
}

/** Per field, why a value cannot be asked for (empty object: all fine). */
export function checkStartOptions(options: StartOptions, limits: StartLimits,
                                  tags: string[] | null = null): Partial<Record<keyof StartOptions, string>> {
  const errors: Partial<Record<keyof StartOptions, string>> = {};
  const memory = options.memory?.trim();
  if (memory) {
    if (['none', '0'].includes(memory.toLowerCase())) {
      if (limits.max_memory !== null) {
        errors.memory = `this server allows at most ${mib(limits.max_memory)}`;
      }
    } else {
      const bytes = parseMemory(memory);
      if (bytes === null) {
        errors.memory = 'a size such as 512m or 2g';
      } else if (limits.max_memory !== null && bytes > limits.max_memory) {
        errors.memory = `at most ${mib(limits.max_memory)} on this server`;
      }
    }
  }
  const cpus = options.cpus?.trim();
  if (cpus) {
    const value = parseCpus(cpus);
    if (value === null) {
      errors.cpus = `a number of cores, at least ${MIN_CPUS}`;
    } else if (limits.max_cpus !== null && value > limits.max_cpus) {
      errors.cpus = `at most ${limits.max_cpus} on this server`;
    }
  }
  if (options.network && !limits.networks.includes(options.network)) {
    errors.network = `not allowed here (allowed: ${limits.networks.join(', ')})`;
  }
  const tag = options.tag?.trim();
  if (tag) {
    if (!TAG.test(tag)) {
      errors.tag = 'letters, digits, _ . - (up to 128)';
    } else if (tags !== null && !tags.includes(tag)) {
      errors.tag = 'not in the image store (pull it first)';
    }
  }
  return errors;
}

/** The options without empty fields (what is sent and recorded). */
export function compactOptions(options: StartOptions): StartOptions {
  const out: StartOptions = {};
  for (const field of FIELDS) {
    const value = options[field]?.trim();
    if (value) {
      out[field] = value;
    }
  }
  return out;
}

/** The repository of a reference ("localhost/debian:bookworm" -> "localhost/debian"). */
export function repositoryOf(reference: string): string {
  let name = reference.split('@')[0];
  const slash = name.lastIndexOf('/');
  const colon = name.lastIndexOf(':');
  if (colon > slash) {
    name = name.slice(0, colon);
  }
  return name;
}

/** The tag of a reference, or null ("latest" is spelled out by the server, so none is assumed). */
export function tagOf(reference: string): string | null {
  const name = reference.split('@')[0];
  const slash = name.lastIndexOf('/');
  const colon = name.lastIndexOf(':');
  return colon > slash ? name.slice(colon + 1) : null;
}

/**
 * The tags the store has for the kernelspec image's repository, sorted. The kernelspec may
 * name its image in the short form ("debian:bookworm") while the store lists the full one
 * ("localhost/debian:bookworm" or "docker.io/library/debian:bookworm").
 */
export function tagsFor(specImage: string, imageNames: string[]): string[] {
  const repo = repositoryOf(specImage);
  const candidates = new Set([repo, `localhost/${repo}`, `docker.io/${repo}`, `docker.io/library/${repo}`]);
  const tags = new Set<string>();
  for (const name of imageNames) {
    const tag = tagOf(name);
    if (tag !== null && candidates.has(repositoryOf(name))) {
      tags.add(tag);
    }
  }
  return [...tags].sort();
}

/**
 * The start options a notebook recorded (`metadata.jupyter_contain.start_options`), or null.
 * A notebook is a file anyone can edit: only short strings in the known fields are kept (the
 * server checks the values again).
 */
export function recordedStartOptions(meta: unknown): StartOptions | null {
  if (!meta || typeof meta !== 'object') {
    return null;
  }
  const raw = (meta as Record<string, unknown>).start_options;
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) {
    return null;
  }
  const out: StartOptions = {};
  for (const field of FIELDS) {
    const value = (raw as Record<string, unknown>)[field];
    if (typeof value === 'string' && value.trim() !== '' && value.length <= 128) {
      out[field] = value.trim();
    }
  }
  return Object.keys(out).length ? out : null;
}

/** One line saying what a start asks for ("memory 1g, 2 CPUs, network bridge, tag v2"), or ''. */
export function describeOptions(options: StartOptions): string {
  const parts: string[] = [];
  if (options.memory) {
    parts.push(`memory ${options.memory}`);
  }
  if (options.cpus) {
    parts.push(`${options.cpus} CPUs`);
  }
  if (options.network) {
    parts.push(`network ${options.network}`);
  }
  if (options.tag) {
    parts.push(`tag ${options.tag}`);
  }
  return parts.join(', ');
}
