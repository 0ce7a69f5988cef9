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
    # From ring 3 (user.rs: the `ud2` that ends a user-mode call, or a
    # fault in user code): back to the kernel context that entered it.
    testb $3, 24(%rsp)          # CS of the interrupted code
    jnz tg_user_return
    mov (%rsp), %rdi            # vector
    mov 8(%rsp), %rsi           # error code
    mov 16(%rsp), %rdx          # rip
    and $-16, %rsp
    call tg_exception           # never returns
    jmp tg_halt

# ---- Ring 3 (user.rs). tg_user_enter(arg, func, stack) saves the
# callee-saved registers and %rsp, then `iretq`s to ring 3 at
# tg_user_trampoline, which calls func(arg) on the user stack and ends with
# `ud2`. The #UD (or any other exception from ring 3) arrives on the TSS's
# RSP0 stack; tg_exception_common sends it to tg_user_return, which
# records the error code and RIP, restores the kernel context and returns
# the vector from tg_user_enter.
    .section .text.tg_user, "ax", @progbits
    .balign 16
    .global tg_user_enter
tg_user_enter:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, tg_user_kernel_rsp(%rip)
    pushq $0x1b                 # SS: user data, RPL 3
    push %rdx                   # RSP: the user stack
    pushq $0x2                  # RFLAGS: IF=0, IOPL=0
    pushq $0x23                 # CS: user code, RPL 3
    lea tg_user_trampoline(%rip), %rax
    push %rax
    iretq
    .global tg_user_trampoline
tg_user_trampoline:
    call *%rsi
    .global tg_user_done
tg_user_done:
    ud2
tg_user_return:
    mov (%rsp), %rax            # vector: tg_user_enter's return value
    mov 8(%rsp), %rcx
    mov %rcx, tg_user_fault_error(%rip)
    mov 16(%rsp), %rcx
    mov %rcx, tg_user_fault_rip(%rip)
    mov tg_user_kernel_rsp(%rip), %rsp
    cld
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

# ---- GDT (writable: `ltr` sets the TSS busy bit): null, 0x08 64-bit
# code, 0x10 flat data, 0x18 user data (DPL 3), 0x20 user 64-bit code (DPL
# 3), 0x28 the 16-byte TSS descriptor that user.rs fills in before `ltr`.
# Accessed bits preset.
    .section .data.boot, "aw", @progbits
    .balign 16
    .global tg_gdt
tg_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cff3000000ffff
    .quad 0x00affb000000ffff
    .quad 0
    .quad 0
tg_gdt_end:
tg_gdt_ptr:
    .word tg_gdt_end - tg_gdt - 1
    .quad tg_gdt
    .balign 8
    .global tg_user_kernel_rsp
tg_user_kernel_rsp:
    .quad 0
    .global tg_user_fault_error
tg_user_fault_error:
    .quad 0
    .global tg_user_fault_rip
tg_user_fault_rip:
    .quad 0

    .section .rodata.boot, "a", @progbits

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
# 4 GiB with 2 MiB pages. PML4[0] -> PDPT, PDPT[0..3] -> 4 PDs. Every
# entry has the user bit: ring-3 code (user.rs) may touch anything (its
# code, stack, the virtqueues, data buffers and virtio-mmio registers);
# CR4.SMEP/SMAP stay off, so ring 0 is not restricted by it.
    .section .data.boot, "aw", @progbits
    .balign 4096
tg_pml4:
    .quad tg_pdpt + 0x7         # present, writable, user
    .fill 511, 8, 0
tg_pdpt:
    .quad tg_pd + 0x0007
    .quad tg_pd + 0x1007
    .quad tg_pd + 0x2007
    .quad tg_pd + 0x3007
    .fill 508, 8, 0
tg_pd:
    .rept 2048
    .quad ((. - tg_pd) << 18) | 0x87    # entry i maps i * 2 MiB; present, writable, user, 2 MiB page
    .endr

# ---- Boot stack (16 KiB).
    .section .stack, "aw", @nobits
    .balign 16
    .space 16384
tg_stack_top:

# ---- Ring-3 stack (64 KiB) and the TSS's RSP0 stack for exceptions from
# ring 3 (tg_user_return only needs a few words of it).
    .balign 16
    .space 65536
    .global tg_user_stack_top
tg_user_stack_top:
    .space 4096
    .global tg_rsp0_top
tg_rsp0_top:
