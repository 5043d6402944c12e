/**
 * The Lab extension's only way to the runtime: the REST API of the server extension
 * (`{base_url}jupyter-contain/api/v1/`, described in jupyter_contain/server/openapi.yaml).
 *
 * Owns: `requestAPI` (auth and XSRF through ServerConnection.makeRequest), the response
 * types, the JSON error shape, and following a long operation (events, or polling).
 * Must not: build URLs from unencoded names, or hold state about kernels (the widgets do).
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { Death, DiffFolder, Progress, Stats } from './format';
import { StartOptions } from './options';
import { SSEParser } from './sse';

export const API_PATH = 'jupyter-contain/api/v1';

/** A failed request, with the server's error code when it sent one. */
export class ContainAPIError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly code: string,
    readonly step: string | null = null
  ) {
    super(message);
    this.name = 'ContainAPIError';
  }
}

/** One path segment: names (image references, kernel ids) are URL-encoded. */
export function seg(name: string): string {
  return encodeURIComponent(name);
}

/** Calls the REST API; resolves to the parsed JSON body (undefined for 204). */
export async function requestAPI<T>(endpoint: string, init: RequestInit = {},
                                    settings: ServerConnection.ISettings = ServerConnection.makeSettings()): Promise<T> {
  const url = URLExt.join(settings.baseUrl, API_PATH, endpoint);
  if (init.body !== undefined && !(init.headers as Record<string, string> | undefined)?.['Content-Type']) {
    init = { ...init, headers: { ...(init.headers as Record<string, string>), 'Content-Type': 'application/json' } };
  }
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ContainAPIError(`jupyter-contain server unreachable: ${error}`, 0, 'network_error');
  }
  if (response.status === 204) {
    return undefined as T;
  }
  const text = await response.text();
  let data: any = undefined;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = undefined;
    }
  }
  if (!response.ok) {
    const err = data?.error;
    if (err && typeof err.message === 'string') {
      throw new ContainAPIError(err.message, response.status, String(err.code ?? 'error'), err.step ?? null);
    }
    const hint = response.status === 404 && !data ? ' (is the jupyter-contain server extension enabled?)' : '';
    throw new ContainAPIError(`${response.status} ${response.statusText}${hint}`, response.status, 'http_error');
  }
  return data as T;
}

export interface Image {
  name: string;
  familiar: string;
  id: string;
  digest: string;
  size: number;
  created: string | null;
  labels: Record<string, string>;
}

export interface Limits {
  memory: number | null;
  cpus: number | null;
  pids: number | null;
}

export interface Container {
  id: string;
  name: string;
  image: string;
  status: string;
  created: string | number | null;
  kernel_id: string | null;
  kernel_name: string | null;
  notebook_path: string | null;
  limits: Limits;
  network: string;
  reason: string | null;
}

export interface KernelContainer {
  contained: boolean;
  container?: Container;
  image?: { name: string; digest: string };
  death?: Death | null;
  /** what the start dialog chose for this kernel (null: the kernelspec's values) */
  start_options?: StartOptions | null;
}

export interface Operation {
  id: string;
  kind: 'pull' | 'push' | 'commit' | 'build';
  target: string;
  state: 'running' | 'succeeded' | 'failed' | 'cancelled';
  created: number;
  finished: number | null;
  progress: Progress;
  /** pull/commit: the image; a commit with install_kernelspec: the kernelspec's name */
  result: { image?: Image; kernelspec?: string | { name: string; display_name?: string } } | null;
  error: { code: string; message: string } | null;
}

export interface Diff {
  total: number;
  bytes: number;
  summary: DiffFolder[];
  truncated: boolean;
}

export interface KernelSpecInfo {
  name: string;
  display_name: string;
  image: string;
  memory: number | string | null;
  cpus: number | string | null;
  pids: number | null;
  network: string | null;
  /** ask for start options before a kernel of it starts */
  start_dialog?: boolean;
}

export interface ServerConfig {
  version: string;
  limits: { max_memory: number | null; max_cpus: number | null; max_pids: number | null; networks: string[] };
  start_options: boolean;
}

export type { Stats };

/** The container of a kernel of this server ({contained: false} for other kernels). */
export function kernelContainer(kernelId: string): Promise<KernelContainer> {
  return requestAPI<KernelContainer>(`kernels/${seg(kernelId)}/container`);
}

export async function kernelStats(kernelId: string): Promise<Stats> {
  return (await requestAPI<{ stats: Stats }>(`kernels/${seg(kernelId)}/container/stats`)).stats;
}

export function kernelDiff(kernelId: string): Promise<Diff> {
  return requestAPI<Diff>(`kernels/${seg(kernelId)}/container/diff`);
}

export async function startCommit(kernelId: string, body: {
  tag: string; message?: string; compress: string; install_kernelspec: boolean; display_name?: string;
}): Promise<Operation> {
  return (await requestAPI<{ operation: Operation }>(`kernels/${seg(kernelId)}/container/commit`,
    { method: 'POST', body: JSON.stringify(body) })).operation;
}

export async function listImages(): Promise<Image[]> {
  return (await requestAPI<{ images: Image[] }>('images')).images;
}

export async function removeImage(name: string): Promise<void> {
  await requestAPI<void>(`images/${seg(name)}`, { method: 'DELETE' });
}

export async function startPull(reference: string): Promise<Operation> {
  return (await requestAPI<{ operation: Operation }>('images/pull',
    { method: 'POST', body: JSON.stringify({ reference }) })).operation;
}

export async function startPush(name: string, target: string): Promise<Operation> {
  return (await requestAPI<{ operation: Operation }>(`images/${seg(name)}/push`,
    { method: 'POST', body: JSON.stringify(target ? { target } : {}) })).operation;
}

export async function listContainers(): Promise<Container[]> {
  return (await requestAPI<{ containers: Container[] }>('containers')).containers;
}

export async function containerStats(id: string): Promise<Stats> {
  return (await requestAPI<{ stats: Stats }>(`containers/${seg(id)}/stats`)).stats;
}

export async function stopContainer(id: string): Promise<void> {
  await requestAPI<unknown>(`containers/${seg(id)}/stop`, { method: 'POST', body: '{}' });
}

export async function listOperations(): Promise<Operation[]> {
  return (await requestAPI<{ operations: Operation[] }>('operations')).operations;
}

export async function getOperation(id: string): Promise<Operation> {
  return (await requestAPI<{ operation: Operation }>(`operations/${seg(id)}`)).operation;
}

export async function cancelOperation(id: string): Promise<void> {
  await requestAPI<unknown>(`operations/${seg(id)}`, { method: 'DELETE' });
}

export async function installKernelspec(body: {
  image: string; name?: string; display_name?: string; memory?: string; cpus?: string; network?: string;
}): Promise<KernelSpecInfo> {
  return (await requestAPI<{ kernelspec: KernelSpecInfo }>('kernelspecs',
    { method: 'POST', body: JSON.stringify(body) })).kernelspec;
}

export async function listKernelspecs(): Promise<KernelSpecInfo[]> {
  return (await requestAPI<{ kernelspecs: KernelSpecInfo[] }>('kernelspecs')).kernelspecs;
}

/** Starts a contained kernel with per-start options; the caller attaches its session to the id. */
export function startKernel(body: { name: string; path?: string; options: StartOptions }):
    Promise<{ kernel: { id: string; name: string }; options: StartOptions }> {
  return requestAPI('kernels', { method: 'POST', body: JSON.stringify(body) });
}

export function serverConfig(): Promise<ServerConfig> {
  return requestAPI<ServerConfig>('config');
}

function finished(op: Operation): boolean {
  return op.state !== 'running';
}

/**
 * Follows an operation to its end, calling `onUpdate` with each state; resolves with the final
 * one. Reads the event stream through makeRequest (so the token and cookies go along as for
 * every request); if the stream fails or ends early, polls every 500 ms instead.
 */
export async function followOperation(op: Operation, onUpdate: (op: Operation) => void,
                                      settings: ServerConnection.ISettings = ServerConnection.makeSettings()): Promise<Operation> {
  onUpdate(op);
  if (finished(op)) {
    return op;
  }
  let last = op;
  try {
    const url = URLExt.join(settings.baseUrl, API_PATH, 'operations', seg(op.id), 'events');
    const response = await ServerConnection.makeRequest(url, { headers: { Accept: 'text/event-stream' } }, settings);
    if (response.ok && response.body) {
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const parser = new SSEParser();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) {
          break;
        }
        for (const data of parser.push(decoder.decode(value, { stream: true }))) {
          let next: Operation;
          try {
            next = JSON.parse(data);
          } catch {
            continue;
          }
          if (next && next.id === op.id && next.progress) {
            last = next;
            onUpdate(last);
          }
        }
        if (finished(last)) {
          void reader.cancel();
          return last;
        }
      }
    }
  } catch (error) {
    console.debug('jupyter-contain: operation events unavailable, polling', error);
  }
  while (!finished(last)) {
    await new Promise(resolve => setTimeout(resolve, 500));
    last = await getOperation(op.id);
    onUpdate(last);
  }
  return last;
}
