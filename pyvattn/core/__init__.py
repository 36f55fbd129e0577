"""The pieces behind :class:`pyvattn.KVCache` (see README, "Design").

* ``layout``: :class:`Layout`, the arguments checked and the sizes that follow from them;
* ``slots``: :class:`SlotTable`, which request slots are in use and how far each was stepped,
  and the one parser of ``step()`` input;
* ``slabs``: :class:`Slabs`, how many pages each slot holds in every region, grown and shrunk
  through the backend (whose books are the truth);
* ``growth``: :class:`MappingEngine`, what a step maps and what it reclaims when pages fall short;
* ``reclaim``: :class:`Reclaim`, the pure plan of which mapped pages to give back;
* ``prefix``: :class:`PrefixIndex`, each slot's prompt as a block-hash chain, and last-use ticks;
* ``sharing``: :class:`PrefixSharing`, forks and prefix reuse (which slot, what it inherits);
* ``stats``: :class:`CacheStats`, activity counters and the ``stats()`` report;
* ``mapper``: :class:`BackgroundMapper`, ``step_async``'s one worker thread;
* ``elastic``: what a new request can still get (``free_tokens``/``can_admit``), a budget changed
  at run time, and sleep/wake with :class:`SavedKV`, the running requests' KV kept in host memory.
"""
