/* poison.h — POISON and UNPOISON: memory Lua freed, kept by tide's allocators, marked for ASan.
 *
 * Under ASan a block kept or free in the allocator cache (alloc_cache.c)
 * or the arena (arena.c) is poisoned until it is handed out again: C code
 * that reads Lua memory after Lua freed it is caught (LuaJIT's own
 * allocator is not instrumented).  Without ASan they do nothing. */
#ifndef TIDE_POISON_H
#define TIDE_POISON_H

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#endif
