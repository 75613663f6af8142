/* alloc_cache.h — freed blocks of a Lua state kept for reuse, in front of its allocator.
 *
 * Why: LuaJIT's allocator gives freed memory back to the kernel soon (its
 * segments are mmap'ed, and one goes back as soon as all of it is free),
 * and a task is one small table: a burst of 200,000 tasks allocates ~27 MB
 * that the next burst, after a full collection, faulted in again, page by
 * page.  On the virtual machines these figures come from, a page fault
 * costs ~20 us, and the faults were more than half of a warm burst's time
 * (bench/RESULTS.md, issue 21; slab.h says the same of thread jobs).  So
 * the cache holds *anchors*: one freed small block in each 512 KiB of
 * address space where small blocks were freed, never handed out, so that
 * no segment is ever wholly free and the allocator keeps it, reusing the
 * memory around the anchors itself (alloc_cache.c says more).  It keeps
 * the last few freed blocks larger than TIDE_ALLOC_CACHE_LARGEST bytes, up
 * to TIDE_ALLOC_CACHE_BIGGEST (the old sizes of an array that grew with a
 * burst: a table's array, the run queue) in a ring, for a while
 * (alloc_cache.c, BIG_LIFETIME), and larger ones up to
 * TIDE_ALLOC_CACHE_HUGEST in a size that came back (a flow's 3 MiB hash
 * parts, made again at each run: the anchors leave the allocator no room
 * for them in the memory it keeps, alloc_cache.c, NSEEN); and, when asked
 * (TIDE_ALLOC_CACHE_SMALL_DEFAULT says why not by default), each freed
 * block of a small size (a multiple of 8: a table, a closure, a coroutine;
 * not every string) on a free list of that exact size.  A block is handed
 * back for the next allocation of its exact size, a block that grows
 * included (its contents are copied into the kept one).  Memory that Lua
 * freed stays with the process, as a V8 or glibc heap does.
 *
 * Bounds: the blocks kept never add up to more than `cap` bytes
 * (tide.configure{ alloc_cache = N }, TIDE_ALLOC_CACHE_DEFAULT), and the
 * anchors never hold more than `cap` bytes of address space (cap / 512 KiB
 * of them), nor, once the heap's recent peak comes down, more than twice
 * that peak: then they all go back (and are taken again where small blocks
 * are freed); the small ones never add up to more than `small_cap`
 * (tide.configure{ alloc_cache_small = N }, 0 by default) nor the heap's recent peak (its largest while the
 * last 64 to 128 MiB were handed out, at least TIDE_ALLOC_CACHE_FLOOR), so
 * that a burst whose tasks all ended leaves its blocks for the next burst;
 * the big ones are bounded by their rings and expire.  A free that would
 * pass a bound goes to the allocator at once, and when the recent peak
 * comes down (each 64 MiB handed out) the small blocks over it go back.
 * The heap may shrink after: an idle process (nothing handed out) keeps up
 * to the cap of what it once used, and the small blocks do not expire
 * otherwise: they stay until taken, the peak comes down, the cap is
 * lowered or the state closes.  When the state's allocator refuses a
 * request, everything kept goes back to it first (a host may bound the
 * state's memory).
 *
 * Safety: a block is handed back only for a request of exactly the size it
 * was freed with (a Lua allocator is told the exact size of every block it
 * frees), and every block comes from the state's own allocator and goes
 * back to it: when the cap is lowered, and before the state closes (a
 * finalizer of tide.core flushes the cache and puts the allocator back, so
 * lua_close frees everything through the allocator it came from).
 *
 * One per state; a state is used by one thread at a time, and so is its cache. */
#ifndef TIDE_ALLOC_CACHE_H
#define TIDE_ALLOC_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#define TIDE_ALLOC_CACHE_DEFAULT ((size_t)64 << 20)   /* cap when not configured */
#define TIDE_ALLOC_CACHE_FLOOR ((size_t)4 << 20)      /* kept even when the heap is smaller */
/* Small blocks are kept only when asked (tide.configure{ alloc_cache_small
 * = N }): handed back in the collector's order, they scatter what is
 * allocated together, and collecting it costs more.  Kept by default, a
 * loop that makes and drops 1 MB tables of records took 65-80% longer, and
 * lua-cjson's in the same process too (bench/RESULTS.md, issue 21); what
 * it saves is a burst's memory faulted in again after a full collection. */
#define TIDE_ALLOC_CACHE_SMALL_DEFAULT ((size_t)0)
#define TIDE_ALLOC_CACHE_LARGEST 512                  /* the largest block on a free list */
/* The largest block kept whenever it is freed: a table's array of 2^18
 * slots and its slot 0 (200,000 task handles), with room.  Larger ones are
 * mostly a burst's last arrays, which the run queue drops on purpose
 * (runq.lua, SPARE_MAX): kept, they were 42 bytes more RSS per task among
 * 1,000,000 asleep (goal <= 700).  So a larger one, up to
 * TIDE_ALLOC_CACHE_HUGEST, is kept only in a size that came back: freed,
 * asked for again, and freed again (alloc_cache.c, keep). */
#define TIDE_ALLOC_CACHE_BIGGEST (((size_t)2 << 20) + 4096)
#define TIDE_ALLOC_CACHE_HUGEST ((size_t)64 << 20)
/* Anchors hold windows of 2^19 bytes (512 KiB) of address space.  An
 * anchor leaves the allocator no free chunk larger than its window in the
 * memory it holds, and LuaJIT's allocator maps anything larger afresh: a
 * 200 KB string made after each full collection was faulted in each time
 * (49 pages) with 64 KiB windows, and is not with 512 KiB ones, which
 * anchor a burst as well (3 bursts of 200,000 tasks: 16,627 / 9 / 0
 * faults either way; bench/RESULTS.md, issue 21). */
#define TIDE_ALLOC_CACHE_ANCHOR_SHIFT 19

/* Puts the cache in front of L's allocator (cap: the default), and a
 * finalizer that takes it out again; a second call does nothing.  0, or -1
 * when it cannot (out of memory: L keeps its allocator).
 *
 * The state's small blocks go in an arena (arena.h) when its allocator is
 * tide__state_alloc, or LuaJIT's own and `luajit_ok` (tide loaded by
 * require, in a process such as `luajit` that closes its state when it
 * ends).  Not in front of LuaJIT's own otherwise (tide_open: a C host may
 * close states and open more): the cache has to stay in front of it to
 * the end of lua_close, and LuaJIT then never destroys its allocator,
 * whose segments stay mapped (~0.7 MB a state).  Not in front of a host's
 * allocator either (it may count or bound the state's memory).
 * TIDE_ARENA=off: never; TIDE_ARENA=on: also in front of LuaJIT's own
 * when not `luajit_ok`. */
int tide__alloc_cache_open(lua_State *L, int luajit_ok);

/* A lua_Alloc of the C library's malloc, for the state of the tide binary:
 * the arena serves most blocks, and the state closes without leaving
 * memory behind.  (A thread task's state keeps LuaJIT's allocator:
 * worker.c says why.) */
void *tide__state_alloc(void *ud, void *p, size_t osize, size_t nsize);

/* Sets the most bytes kept (0: none; the blocks kept over it go back at
 * once).  Returns the bytes kept now, or -1 when L has no cache. */
long long tide__alloc_cache_set(lua_State *L, size_t cap);

/* The bytes kept now, the cap, and the allocations served from the cache
 * (0s when L has no cache). */
void tide__alloc_cache_stats(lua_State *L, size_t *kept, size_t *cap, unsigned long long *hits);

/* Of the bytes kept, those of small blocks (on the free lists; 0 when L
 * has no cache). */
size_t tide__alloc_cache_small(lua_State *L);

/* The anchors held: freed small blocks, one in each 512 KiB of the heap
 * where small blocks were freed, that keep LuaJIT's allocator from giving
 * that memory back to the kernel (alloc_cache.c says why; 0 when L has no
 * cache).  Their bytes are in `kept`. */
size_t tide__alloc_cache_anchors(lua_State *L);

/* The arena's figures (arena.h): 1, or 0 when L's small blocks are not in
 * an arena (a host's allocator, or TIDE_ARENA=off). */
#include "arena.h"
int tide__alloc_cache_arena(lua_State *L, tide_arena_stats *s);

/* Called at the loop's ticks with its time: every 5 s, a purge of the
 * arena (arena.h), as every 64 MiB handed out. */
void tide__alloc_cache_tick(lua_State *L, uint64_t now_ms);

/* Sets the most bytes of small blocks kept (0, the default: none; within
 * the cap and the heap's recent peak too).  Returns the bytes of small
 * blocks kept now, or -1 when L has no cache. */
long long tide__alloc_cache_set_small(lua_State *L, size_t cap);

/* That setting (0 when L has no cache). */
size_t tide__alloc_cache_small_cap(lua_State *L);

#endif
