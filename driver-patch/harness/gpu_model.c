/*
 * gpu_model.c: the page tables, TLB and video memory of the model GPU, and what running one
 * push operation does to them (see stubs.c for the model as a whole).
 */
#include "harness.h"

#define TABLE_HASH 65536

static harness_table_t *table_hash[TABLE_HASH];
static harness_table_t **tables_by_id;
static NvU64 ntables_by_id, cap_tables_by_id;

static unsigned int table_bucket(uvm_page_tree_t *tree, NvU64 start)
{
    return (unsigned int)((((uintptr_t)tree >> 4) ^ (start >> 21) * 2654435761u) % TABLE_HASH);
}

harness_table_t *harness_table_find(uvm_page_tree_t *tree, NvU64 start)
{
    harness_table_t *t;

    for (t = table_hash[table_bucket(tree, start)]; t; t = t->hash_next) {
        if (t->tree == tree && t->start == start)
            return t;
    }
    return NULL;
}

harness_table_t *harness_table_new(uvm_page_tree_t *tree, NvU64 start)
{
    harness_table_t *t = calloc(1, sizeof(*t));
    unsigned int b = table_bucket(tree, start);
    int i;

    t->tree = tree;
    t->start = start;
    t->id = ++ntables_by_id;
    for (i = 0; i < 32; i++)
        t->entries[i] = 0xbadbadbadbad0000ULL; // recycled table memory until the init push runs
    if (t->id >= cap_tables_by_id) {
        cap_tables_by_id = cap_tables_by_id * 2 + 1024;
        tables_by_id = realloc(tables_by_id, cap_tables_by_id * sizeof(*tables_by_id));
    }
    tables_by_id[t->id] = t;
    t->hash_next = table_hash[b];
    table_hash[b] = t;
    return t;
}

harness_table_t *harness_table_by_id(NvU64 id)
{
    return id && id <= ntables_by_id ? tables_by_id[id] : NULL;
}

void harness_table_free(harness_table_t *t)
{
    harness_table_t **pp = &table_hash[table_bucket(t->tree, t->start)];

    while (*pp != t)
        pp = &(*pp)->hash_next;
    *pp = t->hash_next;
    tables_by_id[t->id] = NULL;
    free(t);
}

static harness_gpu_t *gpu_of_tree(uvm_page_tree_t *tree)
{
    return container_of(tree->gpu, harness_gpu_t, gpu);
}

NvU64 harness_pte_make(uvm_aperture_t aperture, NvU64 address, uvm_prot_t prot, NvU64 flags)
{
    if (aperture != UVM_APERTURE_VID || (address & 0xffff) || prot == UVM_PROT_NONE)
        harness_fail("make_pte(%d, 0x%llx, %d)", aperture, (unsigned long long)address, prot);
    return address | HARNESS_PTE_VALID | (prot == UVM_PROT_READ_ONLY ? HARNESS_PTE_RO : 0);
}

// The chunk and 64 KiB slot a valid PTE points at.
static harness_chunk_t *pte_target(harness_gpu_t *hg, NvU64 pte, int *slot)
{
    NvU64 phys = pte & ~0xffffULL;
    harness_chunk_t *c = harness_chunk_at(hg, phys);

    if (!c)
        harness_fail("PTE 0x%llx points outside video memory", (unsigned long long)pte);
    *slot = (int)((phys - c->chunk.address) / UVM_PAGE_SIZE_64K);
    return c;
}

static void tlb_set(harness_gpu_t *hg, harness_tlb_entry_t *e, uvm_page_tree_t *tree, NvU64 va, NvU64 pte)
{
    int slot;

    if (e->tree)
        pte_target(hg, e->pte, &slot)->tlb[slot]--;
    e->tree = tree;
    e->va = va;
    e->pte = pte;
    if (tree)
        pte_target(hg, pte, &slot)->tlb[slot]++;
}

void harness_tlb_drop(harness_gpu_t *hg, NvU64 start, NvU64 end)
{
    int i;

    for (i = 0; i < HARNESS_TLB_SIZE; i++) {
        harness_tlb_entry_t *e = &hg->tlb[i];

        if (e->tree && e->va >= start && e->va < end)
            tlb_set(hg, e, NULL, 0, 0);
    }
}

static void entry_set(harness_table_t *t, NvU32 index, NvU64 pte)
{
    harness_gpu_t *hg = gpu_of_tree(t->tree);
    NvU64 old = t->entries[index];
    int slot;

    if (!t->ready)
        harness_fail("PTE of table 0x%llx written before the table was initialised", (unsigned long long)t->start);
    if (old & HARNESS_PTE_VALID)
        pte_target(hg, old, &slot)->ptes[slot]--;
    if (pte & HARNESS_PTE_VALID) {
        harness_chunk_t *c = pte_target(hg, pte, &slot);

        if (!c->live)
            harness_fail("PTE at 0x%llx to a freed chunk", (unsigned long long)(t->start + index * UVM_PAGE_SIZE_64K));
        if (c->tags[slot] == HARNESS_FOREIGN)
            harness_fail("PTE at 0x%llx maps memory holding another process's data",
                         (unsigned long long)(t->start + index * UVM_PAGE_SIZE_64K));
        c->ptes[slot]++;
    }
    else if (pte != 0) {
        harness_fail("invalid PTE 0x%llx is not the empty pattern", (unsigned long long)pte);
    }
    t->entries[index] = pte;
}

void harness_gpu_execute(harness_op_t *op)
{
    NvU64 i;

    switch (op->kind) {
        case HARNESS_OP_MEMSET:
            for (i = op->a; i < op->a + op->b; i += UVM_PAGE_SIZE_64K) {
                harness_chunk_t *c = harness_chunk_at(op->gpu, i);

                if (!c || !c->live)
                    harness_fail("memset into memory that is not allocated (0x%llx)", (unsigned long long)i);
                c->tags[(i - c->chunk.address) / UVM_PAGE_SIZE_64K] = op->c == 0 ? 0 : HARNESS_PATTERN;
            }
            break;
        case HARNESS_OP_TABLE_INIT:
            op->table->ready = true;
            for (i = 0; i < 32; i++)
                op->table->entries[i] = 0;
            break;
        case HARNESS_OP_PTE_WRITE:
            entry_set(op->table, (NvU32)op->a, op->c);
            break;
        case HARNESS_OP_PTE_CLEAR:
            for (i = op->a; i < op->a + op->b; i++)
                entry_set(op->table, (NvU32)i, op->c);
            break;
        case HARNESS_OP_TLB_INVALIDATE:
            harness_tlb_drop(op->gpu, op->a, op->a + op->b);
            break;
        case HARNESS_OP_MEMBAR:
            break;
    }
}

NvU64 harness_pte_at(uvm_page_tree_t *tree, NvU64 va)
{
    harness_table_t *t = harness_table_find(tree, va & ~(UVM_PAGE_SIZE_2M - 1));

    return t && t->ready ? t->entries[(va % UVM_PAGE_SIZE_2M) / UVM_PAGE_SIZE_64K] : 0;
}

// A GPU access to va through tree, like a kernel's load or store: translated through the TLB
// (filled from the page table), faulting (false) where nothing is mapped. A write of `owner`'s
// data tags the memory; *tag is what the memory held before.
static bool gpu_access(harness_gpu_t *hg, uvm_page_tree_t *tree, NvU64 va, bool write, int owner, int *tag);

bool harness_gpu_access(harness_gpu_t *hg, uvm_page_tree_t *tree, NvU64 va, bool write, int owner, int *tag)
{
    bool ok;

    harness_world_lock();
    ok = gpu_access(hg, tree, va, write, owner, tag);
    harness_world_unlock();
    return ok;
}

static bool gpu_access(harness_gpu_t *hg, uvm_page_tree_t *tree, NvU64 va, bool write, int owner, int *tag)
{
    harness_tlb_entry_t *e = &hg->tlb[(va / UVM_PAGE_SIZE_64K) % HARNESS_TLB_SIZE];
    NvU64 pte;
    harness_chunk_t *c;
    int slot;

    va &= ~(UVM_PAGE_SIZE_64K - 1);
    if (e->tree == tree && e->va == va) {
        pte = e->pte;
        // The TLB must never disagree with the page table once an ioctl returned.
        if (pte != harness_pte_at(tree, va))
            harness_fail("stale TLB entry at 0x%llx: 0x%llx cached, 0x%llx in the table",
                         (unsigned long long)va, (unsigned long long)pte, (unsigned long long)harness_pte_at(tree, va));
    }
    else {
        pte = harness_pte_at(tree, va);
        if (!(pte & HARNESS_PTE_VALID))
            return false;
        tlb_set(hg, e, tree, va, pte);
    }
    c = pte_target(hg, pte, &slot);
    if (!c->live)
        harness_fail("GPU access at 0x%llx reaches a freed chunk", (unsigned long long)va);
    *tag = c->tags[slot];
    if (write) {
        if (pte & HARNESS_PTE_RO)
            return false;
        c->tags[slot] = owner;
    }
    return true;
}
