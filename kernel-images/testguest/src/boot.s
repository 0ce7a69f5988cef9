# PVH boot code of the test guest (AT&T syntax, included by main.rs with
# global_asm!). No braces in this file: global_asm! treats them as
# format placeholders.
#
# PVH entry state (xen/include/public/arch-x86/hvm/start_info.h): 32-bit
# protected mode, paging off, flat 4 GiB CS/DS/ES/SS, %ebx = physical
# address of struct hvm_start_info, no usable stack.

# ---- The PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen",
# payload = 8-byte physical entry address (QEMU reads a size_t), in a
# 4-byte aligned SHT_NOTE section (-> PT_NOTE with p_align 4).
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                     # n_namesz ("Xen\0")
    .long 8                     # n_descsz
    .long 18                    # n_type = XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

# ---- 32-bit entry: GDT, PAE page tables, long mode, far jump to 64-bit.
    .section .text.boot, "ax", @progbits
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    # %ebx (start info) is preserved until it is passed to tg_main.
    lgdt tg_gdt_ptr
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs

    mov %cr4, %eax
    or $0x20, %eax              # CR4.PAE
    mov %eax, %cr4

    mov $tg_pml4, %eax
    mov %eax, %cr3

    mov $0xc0000080, %ecx       # IA32_EFER
    rdmsr
    or $0x100, %eax             # EFER.LME
    wrmsr

    mov %cr0, %eax
    or $0x80000001, %eax        # CR0.PG | CR0.PE
    mov %eax, %cr0

    ljmp $0x08, $tg_start64

    .code64
tg_start64:
    mov $tg_stack_top, %rsp
    # Zero .bss (small: the IDT and a flag); the stack is not in it.
    xor %eax, %eax
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $3, %ecx
    rep stosq
    lidt tg_idt_ptr
    mov %ebx, %edi              # zero-extends: start info paddr
    call tg_main                # never returns
tg_halt:
    cli
    hlt
    jmp tg_halt

# ---- CPU exception stubs: 32 stubs, 16 bytes apart (the IDT below
# relies on it), each pushes an error code (0 if the CPU pushes none) and
# the vector, then calls tg_exception(vector, error, rip) in idt.rs.
    .section .text.tg_exception, "ax", @progbits
    .balign 16
    .global tg_exception_stubs
tg_exception_stubs:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    # Positions stub \vec; an error here means a stub grew over 16 bytes.
    .org tg_exception_stubs + 16 * \vec, 0x90
    .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    push $0
    .endif
    push $\vec
    jmp tg_exception_common
    .endr
    .org tg_exception_stubs + 16 * 32, 0x90
tg_exception_common:
    mov (%rsp), %rdi            # vector
    mov 8(%rsp), %rsi           # error code
    mov 16(%rsp), %rdx          # rip
    and $-16, %rsp
    call tg_exception           # never returns
    jmp tg_halt

# ---- GDT: null, 0x08 64-bit code, 0x10 flat data (accessed bits preset).
    .section .rodata.boot, "a", @progbits
    .balign 16
tg_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
tg_gdt_end:
tg_gdt_ptr:
    .word tg_gdt_end - tg_gdt - 1
    .quad tg_gdt

# ---- IDT for the 32 CPU exceptions, fully initialised by the loader (a
# fill loop would cost hundreds of emulated instructions). The gate
# offsets are split by the linker: tg_exc_stubs_lo16/hi16 are defined in
# linker.ld from the address of tg_exception_stubs.
    .balign 16
tg_idt:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .word tg_exc_stubs_lo16 + 16 * \vec   # offset 15:0
    .word 0x08                  # code selector
    .byte 0                     # no IST
    .byte 0x8e                  # present, DPL 0, 64-bit interrupt gate
    .word tg_exc_stubs_hi16     # offset 31:16
    .long 0                     # offset 63:32
    .long 0
    .endr
tg_idt_end:
tg_idt_ptr:
    .word tg_idt_end - tg_idt - 1
    .quad tg_idt

# ---- Page tables, fully initialised by the loader (no fill loop, which
# would cost ~2 ms of emulated instructions): identity map of the first
# 4 GiB with 2 MiB pages. PML4[0] -> PDPT, PDPT[0..3] -> 4 PDs.
    .section .data.boot, "aw", @progbits
    .balign 4096
tg_pml4:
    .quad tg_pdpt + 0x3         # present, writable
    .fill 511, 8, 0
tg_pdpt:
    .quad tg_pd + 0x0003
    .quad tg_pd + 0x1003
    .quad tg_pd + 0x2003
    .quad tg_pd + 0x3003
    .fill 508, 8, 0
tg_pd:
    .rept 2048
    .quad ((. - tg_pd) << 18) | 0x83    # entry i maps i * 2 MiB; present, writable, 2 MiB page
    .endr

# ---- Boot stack (16 KiB).
    .section .stack, "aw", @nobits
    .balign 16
    .space 16384
tg_stack_top:
