/**
 * Pure helpers of the Lab extension: formatting, the limit colour of the meter,
 * tag validation, the diff summary and the texts of the death and digest dialogs.
 *
 * Owns: every string and threshold the widgets show, so jest tests them without a
 * browser. Must not: import JupyterLab, touch the DOM or the network.
 */

/** Bytes as a short binary-unit text: 0 B, 512 B, 1.5 KiB, 512 MiB, 2.0 GiB. */
export function formatBytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !Number.isFinite(n) || n < 0) {
    return '?';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  if (unit === 0) {
    return `${Math.round(value)} B`;
  }
  // one decimal below 10 so 1.5 GiB stays visible, none above (512 MiB, not 512.0 MiB)
  const text = value < 10 ? value.toFixed(1) : Math.round(value).toString();
  return `${text.replace(/\.0$/, '')} ${units[unit]}`;
}

/** Cores as text: 1 CPU, 0.5 CPU, 2 CPUs. */
export function formatCpus(cores: number | null | undefined): string {
  if (cores === null || cores === undefined || !Number.isFinite(cores)) {
    return '';
  }
  const text = Number.isInteger(cores) ? cores.toString() : cores.toFixed(2).replace(/0$/, '');
  return `${text} CPU${cores === 1 || cores < 1 ? '' : 's'}`;
}

/** A percentage with no decimals above 10, one below: 3.2%, 45%. */
export function formatPercent(p: number | null | undefined): string {
  if (p === null || p === undefined || !Number.isFinite(p)) {
    return '?';
  }
  const clamped = Math.max(0, p);
  return `${clamped < 10 ? clamped.toFixed(1).replace(/\.0$/, '') : Math.round(clamped)}%`;
}

/** An RFC 3339 time (or unix seconds) as "YYYY-MM-DD HH:MM" in local time; '' when absent. */
export function formatTime(t: string | number | null | undefined): string {
  if (t === null || t === undefined || t === '') {
    return '';
  }
  const d = typeof t === 'number' ? new Date(t * 1000) : new Date(t);
  if (Number.isNaN(d.getTime())) {
    return '';
  }
  const pad = (v: number) => v.toString().padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/** How close a value is to its limit: the meter's colour. */
export type Level = 'ok' | 'warn' | 'critical';

/** Warn from 75% of a limit, critical from 90% (memory near 90% is a few allocations from the OOM killer). */
export const WARN_FRACTION = 0.75;
export const CRITICAL_FRACTION = 0.9;

export function limitLevel(used: number | null | undefined, limit: number | null | undefined): Level {
  if (used === null || used === undefined || limit === null || limit === undefined || !(limit > 0)) {
    return 'ok';
  }
  const fraction = used / limit;
  if (fraction >= CRITICAL_FRACTION) {
    return 'critical';
  }
  return fraction >= WARN_FRACTION ? 'warn' : 'ok';
}

/** The worst of several levels. */
export function worstLevel(...levels: Level[]): Level {
  if (levels.includes('critical')) {
    return 'critical';
  }
  return levels.includes('warn') ? 'warn' : 'ok';
}

/** Container stats as the REST API sends them (GET .../stats). */
export interface Stats {
  memory: { current: number; peak: number | null; limit: number | null };
  cpu: { usage_ns: number; percent: number | null; limit: number | null };
  pids: { current: number; limit: number | null };
  time: number;
}

/**
 * CPU use in percent of one core between two samples, from the cgroup's usage counter;
 * null when the samples cannot be compared (first sample, counter reset after a restart).
 */
export function cpuPercent(prev: Stats | null, cur: Stats): number | null {
  if (cur.cpu.percent !== null && cur.cpu.percent !== undefined) {
    return cur.cpu.percent;
  }
  if (!prev) {
    return null;
  }
  const dt = cur.time - prev.time;
  const dns = cur.cpu.usage_ns - prev.cpu.usage_ns;
  if (!(dt > 0) || dns < 0) {
    return null;
  }
  return (dns / 1e9 / dt) * 100;
}

/** The parts of the status bar item, each with its level. */
export interface MeterParts {
  memory: { text: string; level: Level };
  cpu: { text: string; level: Level };
  pids: { text: string; level: Level };
  level: Level;
  title: string;
}

export function meterParts(stats: Stats, cpu: number | null): MeterParts {
  const mem = stats.memory;
  const memText = `Mem ${formatBytes(mem.current)}${mem.limit ? ` / ${formatBytes(mem.limit)}` : ''}`;
  const memLevel = limitLevel(mem.current, mem.limit);
  // CPU percent is of one core; the limit is in cores, so 100% x cores is the ceiling
  const cpuLimitPercent = stats.cpu.limit ? stats.cpu.limit * 100 : null;
  // no percent until a second sample (the usage counter needs two): a dash, not a question mark
  const cpuText = `CPU ${cpu === null ? '–' : formatPercent(cpu)}${stats.cpu.limit ? ` / ${formatCpus(stats.cpu.limit)}` : ''}`;
  const cpuLevel = limitLevel(cpu, cpuLimitPercent);
  const pids = stats.pids;
  const pidsText = `Procs ${pids.current}${pids.limit ? ` / ${pids.limit}` : ''}`;
  const pidsLevel = limitLevel(pids.current, pids.limit);
  const title = [
    `Container memory: ${formatBytes(mem.current)} used` +
      (mem.limit ? ` of ${formatBytes(mem.limit)}` : ' (no limit)') +
      (mem.peak ? `, peak ${formatBytes(mem.peak)}` : ''),
    `CPU: ${formatPercent(cpu)} of one core` + (stats.cpu.limit ? `, limit ${formatCpus(stats.cpu.limit)}` : ''),
    `Processes: ${pids.current}` + (pids.limit ? ` of ${pids.limit}` : '')
  ].join('\n');
  return {
    memory: { text: memText, level: memLevel },
    cpu: { text: cpuText, level: cpuLevel },
    pids: { text: pidsText, level: pidsLevel },
    level: worstLevel(memLevel, cpuLevel, pidsLevel),
    title
  };
}

// The reference grammar of the distribution spec (distribution/reference), the rules
// `jupyter contain snapshot` and the server apply; checked here only to help while typing.
const COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const DOMAIN_COMPONENT = /^(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])$/;
const TAG = /^[\w][\w.-]{0,127}$/;
const PORT = /^[0-9]+$/;

/** Why `ref` is not a valid image name[:tag], or null when it is. */
export function validateTag(ref: string): string | null {
  if (ref.trim() === '') {
    return 'enter a name, e.g. my-env:v1';
  }
  if (ref !== ref.trim()) {
    return 'no spaces around the name';
  }
  if (ref.length > 255) {
    return 'at most 255 characters';
  }
  if (ref.includes('@')) {
    return 'a snapshot gets a tag, not a digest (no @)';
  }
  let rest = ref;
  let tag: string | null = null;
  const lastSlash = rest.lastIndexOf('/');
  const colon = rest.lastIndexOf(':');
  if (colon > lastSlash) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG.test(tag)) {
      return `invalid tag "${tag}": letters, digits, _ . - (up to 128, not starting with . or -)`;
    }
  }
  const parts = rest.split('/');
  let first = 0;
  if (parts.length > 1 && (parts[0].includes('.') || parts[0].includes(':') || parts[0] === 'localhost')) {
    const [host, port] = parts[0].split(':', 2);
    if (!host.split('.').every(c => DOMAIN_COMPONENT.test(c))) {
      return `invalid registry host "${parts[0]}"`;
    }
    if (port !== undefined && !PORT.test(port)) {
      return `invalid registry port "${port}"`;
    }
    first = 1;
  }
  for (const component of parts.slice(first)) {
    if (component === '') {
      return 'empty path component (//, or a leading or trailing /)';
    }
    if (component !== component.toLowerCase()) {
      return `"${component}": repository names are lowercase`;
    }
    if (!COMPONENT.test(component)) {
      return `invalid name component "${component}": lowercase letters and digits, separated by . _ __ or -`;
    }
  }
  return null;
}

/** One folder of a container's diff (GET .../diff summary). */
export interface DiffFolder {
  path: string;
  added: number;
  changed: number;
  deleted: number;
  bytes: number;
}

/** The diff summary as rows for the snapshot dialog: largest folders first, the rest folded into one row. */
export function diffRows(summary: DiffFolder[], max = 8): DiffFolder[] {
  const sorted = [...summary].sort((a, b) => b.bytes - a.bytes || a.path.localeCompare(b.path));
  if (sorted.length <= max) {
    return sorted;
  }
  const rest = sorted.slice(max - 1);
  const other: DiffFolder = { path: `${rest.length} other folders`, added: 0, changed: 0, deleted: 0, bytes: 0 };
  for (const r of rest) {
    other.added += r.added;
    other.changed += r.changed;
    other.deleted += r.deleted;
    other.bytes += r.bytes;
  }
  return [...sorted.slice(0, max - 1), other];
}

/** "+12 ~3 -1" for a diff row. */
export function diffCounts(row: { added: number; changed: number; deleted: number }): string {
  return `+${row.added} ~${row.changed} -${row.deleted}`;
}

/** Progress of a long operation (pull, push, commit), as the REST API sends it. */
export interface Progress {
  stage: string;
  done: number;
  total: number | null;
  items: { id: string; done: number; total: number | null; state: 'waiting' | 'running' | 'done' }[];
}

/** A fraction in [0, 1], or null when the total is unknown (an indeterminate bar). */
export function progressFraction(done: number, total: number | null | undefined, finished = false): number | null {
  if (finished) {
    return 1;
  }
  if (total === null || total === undefined || !(total > 0)) {
    return null;
  }
  return Math.min(1, Math.max(0, done / total));
}

/** "12 MiB of 30 MiB" or "12 MiB". */
export function progressText(done: number, total: number | null | undefined): string {
  return total ? `${formatBytes(done)} of ${formatBytes(total)}` : formatBytes(done);
}

/** A digest shortened for display: sha256:0123456789ab. */
export function shortDigest(digest: string | null | undefined): string {
  if (!digest) {
    return '';
  }
  const [algo, hex] = digest.includes(':') ? digest.split(':', 2) : ['sha256', digest];
  return `${algo}:${hex.slice(0, 12)}`;
}

/** What the REST API says about a contained kernel's death. */
export interface Death {
  reason: string;
  oom_killed: boolean;
  signal: number | null;
  code: number | null;
  memory_limit: number | null;
  memory_peak: number | null;
}

/** Deaths worth a dialog: the OOM killer or a signal (a kernel that exits by itself is not a surprise). */
export function deathWorthADialog(death: Death | null | undefined): boolean {
  return !!death && (death.oom_killed || (death.signal !== null && death.signal !== undefined));
}

/** The dialog's title and text for a death. */
export function deathText(death: Death): { title: string; body: string; hint: string } {
  if (death.oom_killed) {
    const limit = death.memory_limit ? formatBytes(death.memory_limit) : null;
    return {
      title: 'Kernel killed: out of memory',
      body: death.reason,
      hint:
        'The kernel used all the memory its container may use' +
        (limit ? ` (${limit})` : '') +
        '. Variables are lost; files and installed packages in the container are kept. ' +
        'Restart the kernel, or install the image as a kernel with a higher memory limit.'
    };
  }
  return {
    title: `Kernel killed by signal ${death.signal}`,
    body: death.reason,
    hint: 'Variables are lost; files and installed packages in the container are kept.'
  };
}

/** What the notebook records about the image its kernel ran (metadata.jupyter_contain). */
export interface ImageRecordMeta {
  image: string;
  digest: string;
  kernelspec?: string;
}

/**
 * Why the image a notebook recorded differs from the one its kernel runs now, or null
 * when it does not (or nothing was recorded).
 */
export function digestMismatch(recorded: Partial<ImageRecordMeta> | null | undefined,
                               current: { name: string; digest: string }): string | null {
  if (!recorded || typeof recorded.digest !== 'string' || recorded.digest === '') {
    return null;
  }
  if (recorded.digest === current.digest) {
    return null;
  }
  return (
    `This notebook last ran on ${recorded.image ?? 'an image'} at ${shortDigest(recorded.digest)}; ` +
    `its kernel now runs ${current.name} at ${shortDigest(current.digest)}.`
  );
}

/** The pull reference that brings back exactly the recorded image: name@digest (tag dropped). */
export function pinnedReference(image: string, digest: string): string {
  const at = image.indexOf('@');
  let name = at >= 0 ? image.slice(0, at) : image;
  const slash = name.lastIndexOf('/');
  const colon = name.lastIndexOf(':');
  if (colon > slash) {
    name = name.slice(0, colon);
  }
  return `${name}@${digest}`;
}
