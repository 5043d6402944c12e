/**
 * Which kernels are contained: one cached answer per kernel id.
 *
 * Owns: the cache of GET kernels/{id}/container for the "is it contained" question (that
 * answer never changes for a kernel id; a restart keeps the id and the container). Must not:
 * cache death records or stats (callers ask for those fresh).
 */
import { ISessionContext } from '@jupyterlab/apputils';

import { ContainAPIError, KernelContainer, kernelContainer } from './api';

const cache = new Map<string, Promise<KernelContainer>>();

/** The container answer for a kernel; cached when it says whether the kernel is contained. */
export function containerOf(kernelId: string, { fresh = false } = {}): Promise<KernelContainer> {
  const cached = cache.get(kernelId);
  if (cached && !fresh) {
    return cached;
  }
  const request = kernelContainer(kernelId).catch(error => {
    cache.delete(kernelId);
    if (error instanceof ContainAPIError && error.status === 404) {
      return { contained: false } as KernelContainer;
    }
    throw error;
  });
  cache.set(kernelId, request);
  return request;
}

/** The kernel id of a session context, or null. */
export function kernelIdOf(context: ISessionContext | null | undefined): string | null {
  return context?.session?.kernel?.id ?? null;
}
